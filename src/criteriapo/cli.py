"""Command line: parses arguments, calls library functions, prints results. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from criteriapo.errors import CriteriaPOError

console = Console()
err_console = Console(stderr=True)


def _models_fetch(args: argparse.Namespace) -> None:
    from criteriapo.models import fetch_embedded, find_embedded

    m = find_embedded(args.name)
    was_there = m is not None and m.fetched
    t0 = time.perf_counter()
    path = fetch_embedded(args.name)
    state = "already fetched" if was_there else "fetched"
    console.print(f"{args.name}: {state} in {time.perf_counter() - t0:.1f} s -> {path}")


def _models_list(args: argparse.Namespace) -> None:
    from criteriapo.fsutil import cache_dir
    from criteriapo.models import EMBEDDED

    console.print(f"embedded models (cache: {cache_dir()})")
    for m in EMBEDDED.values():
        state = f"fetched: {m.path}" if m.fetched else "not fetched (criteriapo models fetch " + m.name + ")"
        console.print(f"  {m.name}  {m.hf_id}  {state}\n      {m.description}", highlight=False)


def _data_check(args: argparse.Namespace) -> None:
    from criteriapo.data.check import check_data
    from criteriapo.data.tokenize import ChatTokenizer
    from criteriapo.models import load_tokenizer, resolve_model

    tokenizer = None
    if args.model != "none":
        source = resolve_model(args.model)
        tokenizer = ChatTokenizer(load_tokenizer(source), name=args.model)
    report = check_data(
        args.file,
        kind=args.kind,
        split=args.split,
        tokenizer=tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    loaded = report.loaded
    styles = ", ".join(f"{k}: {v}" for k, v in sorted(loaded.styles.items()))
    console.print(f"[bold]{args.file}[/]")
    console.print(f"format: {loaded.kind} ({styles})")
    console.print(f"rows: {loaded.rows_read} read, {len(loaded.examples)} usable, {len(loaded.bad_rows)} bad")
    if report.criteria:
        console.print("criteria: " + ", ".join(f"{k} ({v} rows)" for k, v in report.criteria.items()))
    if report.lengths:
        table = Table(title=f"token lengths ({args.model})")
        for col in ("", "min", "mean", "p50", "p95", "max"):
            table.add_column(col, justify="right")
        for s in report.lengths:
            table.add_row(*s.row())
        console.print(table)
        if args.max_length is not None:
            over = report.over_max_length
            console.print(
                f"rows longer than max_length {args.max_length} (their completions get cut): {over}"
            )
    problems = report.problems
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s):[/]")
        for b in problems:
            console.print(f"  {b}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problems found[/]")
    if problems and args.strict:
        raise SystemExit(1)


def _generate(args: argparse.Namespace) -> None:
    from criteriapo.generation import chat_messages, generate
    from criteriapo.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(args.model)
    model = load_model(source, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(source)
    reply = generate(
        model,
        tokenizer,
        chat_messages(args.prompt, args.system),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    console.print(f"[bold]user:[/] {args.prompt}", highlight=False)
    console.print(f"[bold]assistant ({args.model}):[/]", highlight=False)
    console.print(reply, highlight=False, markup=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="criteriapo", description="Preference-tune language models, criteria first."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the embedded default model and the model cache")
    msub = models.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="convert an embedded model into the cache (instant once done)")
    f.add_argument("name", nargs="?", default="smollm2")
    f.set_defaults(func=_models_fetch)
    msub.add_parser("list", help="list embedded models and whether they are fetched").set_defaults(
        func=_models_list
    )

    data = sub.add_parser("data", help="inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="format, row counts, token lengths and every problem of a dataset")
    c.add_argument("file", help="JSONL, JSON, Parquet, CSV file or a saved datasets folder")
    c.add_argument(
        "--model", default="smollm2", help="tokenizer for token lengths (default: smollm2; 'none' to skip)"
    )
    c.add_argument("--kind", default="auto", choices=["auto", "preference", "sft", "multi_criteria"])
    c.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    c.add_argument("--max-length", type=int, default=None)
    c.add_argument("--max-prompt-length", type=int, default=None)
    c.add_argument("--strict", action="store_true", help="exit with status 1 when any problem is found")
    c.set_defaults(func=_data_check)

    g = sub.add_parser("generate", help="answer one prompt with a chat model")
    g.add_argument("model", help="model folder, .gguf file, embedded name (smollm2) or cached hub id")
    g.add_argument("prompt")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    import transformers

    args = build_parser().parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # our own output says what is happening
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    try:
        args.func(args)
    except CriteriaPOError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
