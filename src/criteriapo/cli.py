"""Command line: parses arguments, calls library functions, prints results. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from criteriapo.errors import CriteriaPOError, Interrupted

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


def _say_long_rows(report, args: argparse.Namespace) -> None:
    console.print(f"rows longer than max_length {args.max_length} (cut to fit): {report.over_max_length}")
    long = {"cut": report.prompts_cut, "drop": report.prompts_dropped}.get(args.long_prompts)
    if long is not None:
        done = "prompt cut from the start" if args.long_prompts == "cut" else "left out"
        how = f"{done}, --long-prompts {args.long_prompts}"
        console.print(
            f"rows whose prompt alone reaches max_length ({how}): {long}",
            highlight=False,
            soft_wrap=True,
        )


def _data_check(args: argparse.Namespace) -> int:
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
        max_row_bytes=args.max_row_bytes,
        long_prompts=args.long_prompts,
    )
    loaded = report.loaded
    styles = ", ".join(f"{k}: {v}" for k, v in sorted(loaded.styles.items()))
    console.print(f"[bold]{escape(str(args.file))}[/]")
    converted = f", converted from {loaded.layout} layout" if loaded.layout else ""
    console.print(f"format: {loaded.kind} ({styles}){converted}", highlight=False, soft_wrap=True)
    unusable = len({(b.file, b.row) for b in report.token_problems})
    console.print(
        f"rows: {loaded.rows_read} read, {len(loaded.examples) - unusable} usable, "
        f"{len(loaded.bad_rows)} unreadable or invalid, {unusable} that cannot be tokenized",
        highlight=False,
    )
    if report.criteria:
        criteria = ", ".join(f"{k} ({v} rows)" for k, v in report.criteria.items())
        console.print("criteria: " + criteria, markup=False, highlight=False)
    if report.lengths:
        table = Table(title=f"token lengths ({args.model})")
        for col in ("", "min", "mean", "p50", "p95", "max"):
            table.add_column(col, justify="right")
        for s in report.lengths:
            table.add_row(*s.row())
        console.print(table)
        if args.max_length is not None:
            _say_long_rows(report, args)
    problems = report.problems
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s):[/]")
        for b in problems:
            console.print(f"  {b}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problems found[/]")
    if len(loaded.examples) == unusable:
        console.print("[bold red]no usable rows:[/] nothing here can be trained on")
        return 1
    return 1 if problems and args.strict else 0


def _make_criteria(args: argparse.Namespace) -> None:
    from criteriapo.criteria.maker import MakerOptions, make_criteria_dataset

    opts = MakerOptions(
        prompts=args.prompts,
        samples=args.samples,
        held_out=args.held_out,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        decoys=args.decoys,
    )
    t0 = time.perf_counter()
    counts = make_criteria_dataset(Path(args.out), args.model, opts)
    console.print(
        f"{counts['train']} train and {counts['heldout']} held-out prompts, {counts['completions']} "
        f"scored replies ({counts['edited']} edited; {counts['left_out']} prompts left out, with fewer "
        f"than two replies to compare) in {time.perf_counter() - t0:.0f} s -> "
        f"{args.out}/train.jsonl, heldout.jsonl"
    )


def _eval(args: argparse.Namespace) -> None:
    from criteriapo.data.formats import DataKind
    from criteriapo.data.loading import load_data
    from criteriapo.eval.criteria import compare

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CriteriaPOError(f"--out {out} is a file, not a folder: name a folder for the comparison")
    from criteriapo.pipeline import data_paths

    # builtin:criteria-heldout is sampled from the model DPO started from: --reference, else the first
    start = args.reference or args.models[0].split("=", 1)[-1]
    data = load_data(data_paths([args.data], start), kind=DataKind.MULTI_CRITERIA).examples
    models = [
        tuple(m.split("=", 1))
        if "=" in m
        else (Path(m).name if Path(m).name != "model" else Path(m).parent.name, m)
        for m in args.models
    ]
    t0 = time.perf_counter()
    compare(
        models,
        data,
        Path(args.out),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        reference=args.reference,
        beta=args.beta,
        device=args.device,
    )
    console.print(
        (Path(args.out) / "comparison.md").read_text(), markup=False, highlight=False, soft_wrap=True
    )
    console.print(
        f"{len(models)} model(s) in {time.perf_counter() - t0:.0f} s -> {args.out}/comparison.md, "
        "comparison.json, comparison.png"
    )


def _generate(args: argparse.Namespace) -> None:
    from criteriapo.generation import Sampling, chat_messages, generate
    from criteriapo.models import load_model, load_tokenizer, resolve_model

    prompt = args.prompt
    if args.criteria:  # steer a model trained with prompts conditioned on criteria
        from criteriapo.criteria import parse_criteria
        from criteriapo.criteria.pairs import condition_prompt

        prompt = condition_prompt(prompt, [c.description for c in parse_criteria(args.criteria)])
    source = resolve_model(args.model)
    model = load_model(source, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(source)
    messages = chat_messages(prompt, args.system)
    sampling = Sampling(args.max_new_tokens, args.temperature, seed=args.seed)
    reply = generate(model, tokenizer, messages, sampling)
    console.print(f"[bold]user:[/] {prompt}", highlight=False)
    console.print(f"[bold]assistant ({args.model}):[/]", highlight=False)
    console.print(reply, highlight=False, markup=False)


def _config(args: argparse.Namespace):
    from criteriapo.config import load_config
    from criteriapo.pipeline import check_choices

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # only overrides, no config file
        config, overrides = None, [config, *overrides]
    return check_choices(load_config(config, overrides))


def _stage_summary(name: str, result) -> None:
    console.print(f"[bold]{name}[/] done: model folder {result.model_dir}")
    shown = {k: v for k, v in result.metrics.items() if not k.startswith(("logits/", "num_tokens"))}
    console.print("  " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()), highlight=False)


def _claimed(args: argparse.Namespace, command: str):
    """The config, and the run folder owned by this run (see criteriapo.resume.claim_run_folder)."""
    from criteriapo.resume import claim_run_folder
    from criteriapo.stages.methods import stage_dirs

    cfg = _config(args)
    return cfg, claim_run_folder(Path(cfg.output_dir), stage_dirs(cfg, command), args.resume, args.overwrite)


def _sft(args: argparse.Namespace) -> None:
    from criteriapo.pipeline import run_sft

    cfg, claim = _claimed(args, "sft")
    with claim:
        _stage_summary("sft", run_sft(cfg, resume=args.resume))


def _dpo(args: argparse.Namespace, command: str = "dpo") -> None:
    from criteriapo.pipeline import run_dpo

    cfg, claim = _claimed(args, command)
    with claim:
        result = run_dpo(cfg, resume=args.resume)
    _stage_summary(command, result)
    if result.before and result.after:
        _preference_table(result.before, result.after, command)


def _orpo(args: argparse.Namespace) -> None:
    """``criteriapo dpo`` with ``dpo.loss_type=orpo``: from model.name_or_path, no reference."""
    args.overrides = [*args.overrides, "dpo.loss_type=orpo"]
    _dpo(args, "orpo")


def _kto(args: argparse.Namespace) -> None:
    """``criteriapo dpo`` with ``dpo.loss_type=kto``: unpaired rows (or pairs, split in two)."""
    args.overrides = [*args.overrides, "dpo.loss_type=kto"]
    _dpo(args, "kto")


def _preference_table(before, after, name: str = "dpo", method: str | None = None) -> None:
    from criteriapo.stages.methods import title_of

    table = Table(title=f"{name}: held-out preference ({after.pairs} pairs)")
    method = method or title_of(name)
    for col in ("", f"before {method}", f"after {method}"):
        table.add_column(col, justify="right")
    if after.reward_accuracy is not None:  # what DPO optimises: the reward against the reference
        table.add_row("reward accuracy vs reference", "-", f"{after.reward_accuracy:.3f}")
        table.add_row("reward margin vs reference", "-", f"{after.reward_margin:.3f}")
    table.add_row(
        "log-prob accuracy, per token",
        f"{before.normalized_accuracy:.3f}",
        f"{after.normalized_accuracy:.3f}",
    )
    table.add_row("log-prob accuracy, summed", f"{before.accuracy:.3f}", f"{after.accuracy:.3f}")
    table.add_row("mean log-prob margin", f"{before.margin:.2f}", f"{after.margin:.2f}")
    # per criterion, what DPO optimises (summed log-prob accuracy on minimal pairs measures only
    # the length of the edit, the same for every model)
    for k, v in after.reward_by_criterion.items():
        table.add_row(f"reward accuracy: {k}", "-", f"{v:.3f}")
    console.print(table)


def _pipeline(args: argparse.Namespace) -> None:
    from criteriapo.pipeline import run_pipeline
    from criteriapo.stages.methods import method_of

    cfg, claim = _claimed(args, "pipeline")
    with claim:
        r = run_pipeline(cfg, resume=args.resume)
    for name, stage in r.dpo.items():
        if stage.before and stage.after:
            _preference_table(stage.before, stage.after, name, method_of(cfg.dpo).title)
    method = method_of(cfg.dpo).title
    for g in r.generations:
        console.print(f"\n[bold]prompt:[/] {g['prompt']}", highlight=False)
        for key, reply in g.items():
            if key != "prompt":
                label = f"before {method}" if key == "before" else f"after {key}"
                console.print(f"[bold]  {label}:[/] ", end="")
                console.print(reply, markup=False, highlight=False)
    if r.comparison:
        console.print("\n" + r.comparison.read_text(), markup=False, highlight=False, soft_wrap=True)
    times = "  ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items())
    console.print(f"\nwall time: {times}")
    stages = {**({"sft": r.sft} if r.sft else {}), **r.dpo}
    for name, stage in stages.items():  # prepare: data (sampled when made), tokens, model
        console.print(f"  {name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage.seconds.items()))
    if r.sft:
        console.print(f"SFT model: {r.sft.model_dir}")
    for name, stage in r.dpo.items():
        console.print(f"[bold]{method} model ({name}): {stage.model_dir}[/]")
    console.print(f"summary: {r.summary_path}")


CHAT_HELP = "/reset forgets the conversation, /system TEXT sets the system message, /exit (or Ctrl-D) ends"


def _chat(args: argparse.Namespace) -> None:
    from criteriapo.generation import ReplyStream, Sampling
    from criteriapo.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(args.model)
    model = load_model(source, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(source)
    system = args.system
    sampling = Sampling(args.max_new_tokens, args.temperature, seed=args.seed)
    messages: list[dict] = []
    console.print(f"chatting with {args.model}; Ctrl-C stops a reply; {CHAT_HELP}", highlight=False)
    while True:
        try:
            line = console.input("[bold]you:[/] ")
        except EOFError:
            break
        except KeyboardInterrupt:
            console.print(f"\n({CHAT_HELP})", highlight=False)
            continue
        command, _, rest = line.strip().partition(" ")
        if not line.strip():
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = []
            console.print("(conversation forgotten)")
            continue
        if command == "/system":
            system = rest.strip() or None
            console.print(f"(system message {'set' if system else 'removed'})")
            continue
        if command.startswith("/") and command[1:].isalpha():
            console.print(f"(unknown command {command}: {CHAT_HELP})", highlight=False)
            continue
        messages.append({"role": "user", "content": line})
        console.print("[bold]assistant:[/] ", end="")
        conversation = ([{"role": "system", "content": system}] if system else []) + messages
        reply = _streamed(ReplyStream(model, tokenizer, conversation, sampling))
        if reply.finish_reason == "interrupted":
            console.print(" [dim](stopped)[/]", end="")
        elif reply.cut_off:
            console.print(f" [dim](cut off at {args.max_new_tokens} tokens: --max-new-tokens)[/]", end="")
        console.print()
        messages.append({"role": "assistant", "content": reply.text})


def _streamed(stream, out=None):
    """Print a reply as it comes (``out``: the console's); Ctrl-C stops it, and what it said up to
    there is printed whole. Ctrl-C can come while a piece is printed rather than while the stream
    waits for the next (then the stream itself never sees it), so it is stopped here too."""
    out = out or console.out
    try:
        for piece in stream:
            out(piece, end="", highlight=False)
    except KeyboardInterrupt:
        stream.stop()
        for piece in stream:  # the token being made when Ctrl-C came
            out(piece, end="", highlight=False)
    return stream.result()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="criteriapo", description="Preference-tune language models, criteria first."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    for add in (_add_model_commands, _add_data_commands, _add_stage_commands, _add_use_commands):
        add(sub)
    return p


def _add_model_commands(sub) -> None:
    models = sub.add_parser("models", help="the embedded default model and the model cache")
    msub = models.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="convert an embedded model into the cache (instant once done)")
    f.add_argument("name", nargs="?", default="smollm2")
    f.set_defaults(func=_models_fetch)
    msub.add_parser("list", help="list embedded models and whether they are fetched").set_defaults(
        func=_models_list
    )


def _add_data_commands(sub) -> None:
    from criteriapo.config import DataConfig  # light: no torch
    from criteriapo.data.formats import DataKind

    data = sub.add_parser("data", help="inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="format, row counts, token lengths and every problem of a dataset")
    c.add_argument("file", help="JSONL, JSON, Parquet, CSV file or a saved datasets folder")
    c.add_argument(
        "--model", default="smollm2", help="tokenizer for token lengths (default: smollm2; 'none' to skip)"
    )
    c.add_argument("--kind", default="auto", choices=["auto", *(k.value for k in DataKind)])
    c.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    c.add_argument("--max-length", type=int, default=None)
    c.add_argument("--max-prompt-length", type=int, default=None)
    c.add_argument(
        "--long-prompts",
        default="cut",
        choices=["cut", "drop", "error"],
        help="a prompt that alone reaches --max-length: cut, drop or error (as data.long_prompts)",
    )
    c.add_argument(
        "--max-row-bytes",
        type=_positive_int,
        default=DataConfig.max_row_bytes,
        help="a larger row is reported and never parsed (data.max_row_bytes; default %(default)s)",
    )
    c.add_argument("--strict", action="store_true", help="exit with status 1 when any problem is found")
    c.set_defaults(func=_data_check)
    mk = dsub.add_parser(
        "make-criteria",
        help="build multi-criteria data: made prompts, replies sampled from the model, scored",
    )
    mk.add_argument("--out", default="data/criteria", help="folder for train.jsonl and heldout.jsonl")
    mk.add_argument(
        "--model", default="smollm2", help="the model to be tuned: it samples the candidate replies"
    )
    from criteriapo.criteria.maker import MakerOptions  # light: no torch

    d = MakerOptions()
    mk.add_argument("--prompts", type=int, default=d.prompts)
    mk.add_argument("--samples", type=int, default=d.samples, help="sampled replies per prompt")
    mk.add_argument("--held-out", type=float, default=d.held_out)
    mk.add_argument("--seed", type=int, default=d.seed)
    mk.add_argument("--max-new-tokens", type=_positive_int, default=d.max_new_tokens)
    mk.add_argument("--temperature", type=_temperature, default=d.temperature)
    mk.add_argument("--top-p", type=float, default=d.top_p)
    mk.add_argument(
        "--decoys", type=float, default=d.decoys, help="share of prompts given a reply with unasked format"
    )
    mk.set_defaults(func=_make_criteria)


def _add_stage_commands(sub) -> None:
    for name, func, about in (
        ("sft", _sft, "supervised fine-tuning (the config's sft section)"),
        ("dpo", _dpo, "DPO or a variant (the config's dpo section)"),
        ("orpo", _orpo, "ORPO from the base model in one stage (the dpo section, loss_type orpo)"),
        ("kto", _kto, "KTO from unpaired thumbs-up / thumbs-down rows (the dpo section, loss_type kto)"),
        ("pipeline", _pipeline, "SFT, then DPO against the SFT model, evaluation, export"),
    ):
        s = sub.add_parser(name, help=about)
        s.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2 output_dir=runs/x")
        s.add_argument(
            "--resume",
            action="store_true",
            help="go on from the latest valid checkpoint (same config and data required)",
        )
        s.add_argument(
            "--overwrite", action="store_true", help="replace a finished run in the same output_dir"
        )
        s.set_defaults(func=func)


def _add_serve_command(sub) -> None:
    from criteriapo.serve.app import Limits

    limits = Limits()
    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat and text completions) on one model",
        description="Serve MODEL over OpenAI's API: /v1/chat/completions (stream: true for server-sent "
        "events), /v1/completions, /v1/models, /health. Concurrent requests are generated together.",
    )
    s.add_argument("model", help="model folder, .gguf file, embedded name (smollm2) or cached hub id")
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=os.environ.get("CRITERIAPO_API_KEY"),
        help="clients must send Authorization: Bearer KEY (default: $CRITERIAPO_API_KEY; none)",
    )
    s.add_argument("--name", default=None, help="the model's id in the API (default: MODEL as given)")
    s.add_argument("--max-batch", type=_positive_int, default=8, help="requests generated together")
    s.add_argument("--max-queue", type=_positive_int, default=64, help="waiting requests before 429")
    s.add_argument("--max-tokens", type=_positive_int, default=limits.max_tokens, help="per request")
    s.add_argument("--max-prompt-tokens", type=_positive_int, default=limits.max_prompt_tokens)
    s.add_argument("--max-body-bytes", type=_positive_int, default=limits.max_body_bytes)
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from criteriapo.serve.app import Limits
    from criteriapo.serve.run import ServeOptions, serve

    limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_tokens)
    key = args.api_key or None  # an empty CRITERIAPO_API_KEY is no key
    opts = ServeOptions(args.host, args.port, key, args.max_batch, args.max_queue, limits, args.name)
    serve(args.model, opts, args.dtype, args.device)


def _add_use_commands(sub) -> None:
    """eval, chat and generate: the models a run made, put to use."""
    ev = sub.add_parser("eval", help="preference accuracy and criteria pass rates of one or more models")
    ev.add_argument("models", nargs="+", help="model folders or names, optionally NAME=MODEL")
    ev.add_argument(
        "--data",
        required=True,
        help="held-out multi-criteria data (a file, or builtin:criteria-heldout as the pipeline makes it)",
    )
    ev.add_argument("--out", default="runs/eval")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=64)
    ev.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--reference", default=None, help="the model DPO started from: adds reward accuracy against it"
    )
    ev.add_argument("--beta", type=float, default=0.1, help="DPO's beta, scaling the reported margin")
    ev.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    ev.set_defaults(func=_eval)

    ch = sub.add_parser("chat", help="interactive chat with a model, streamed")
    ch.add_argument("model")
    ch.add_argument("--system", default=None)
    ch.add_argument("--max-new-tokens", type=_positive_int, default=256)
    ch.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ch.add_argument("--device", default="auto")
    ch.set_defaults(func=_chat)

    _add_serve_command(sub)

    g = sub.add_parser("generate", help="answer one prompt with a chat model")
    g.add_argument("model", help="model folder, .gguf file, embedded name (smollm2) or cached hub id")
    g.add_argument("prompt")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument(
        "--criteria", default=None, help="criteria to steer by, ';'-separated: 'max_words:20;no_commas'"
    )
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    g.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_generate)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a temperature: use 0 (greedy) or more")
    return value


def main(argv: list[str] | None = None) -> int:
    import transformers

    args = build_parser().parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # our own output says what is happening
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    console.quiet = not rank0
    logging.basicConfig(
        level=(logging.INFO if args.verbose else logging.WARNING) if rank0 else logging.ERROR,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    # transformers imports torchao when it is installed; its optional CUDA kernels fail to load on a
    # CPU build and say so, and its types are registered with a deprecation notice: neither concerns
    # us (we use its optimizer only), so they are not shown unless --verbose
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.ERROR)
    try:
        code = args.func(args)  # a command returns its exit status, or nothing for 0
    except Interrupted as e:
        err_console.print(f"[bold yellow]stopped:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 130
    except CriteriaPOError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line here, the traceback in a file
        log_path = _crash_log()
        err_console.print(
            f"[bold red]internal error:[/] {escape(type(e).__name__)}: {escape(str(e))} (a bug in "
            f"criteriapo; the traceback is in {log_path}, please include it when reporting)",
            highlight=False,
            soft_wrap=True,  # a path broken over two lines cannot be copied
        )
        return 1
    finally:
        _leave_process_group()
    return code or 0


def _crash_log() -> Path:
    """The current exception's traceback, written to a new file in the cache folder's ``logs``."""
    import traceback

    from criteriapo.fsutil import cache_dir

    folder = cache_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"criteriapo {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}", encoding="utf-8")
    return path


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
