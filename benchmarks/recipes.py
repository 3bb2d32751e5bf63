"""The recipes compared honestly: vanilla, mini and finegrained (and finegrained conditioned on the
criterion) each trained with several seeds from the same starting model on the same on-policy
criteria data, then judged on held-out prompts worded unlike any training prompt: pass rate per
criterion family, repetition, cut-offs and held-out reward accuracy, as mean and spread (sample
standard deviation) over seeds. A difference between two recipes is called real only when it
exceeds both spreads added together (about two standard errors for three seeds); else the table
says the recipes do not differ there.

    .venv/bin/python benchmarks/recipes.py --seeds 0 1 2 --prompts 256 --held-out 0.5 --data-seed 2 \
        dpo.optim.lr=4e-5 dpo.train.epochs=1

The starting model is the SFT model of the main job when it exists (``--model``), else the
embedded default. Every figure is printed and written to benchmarks/results/recipes-*.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from criteriapo.config import load_config
from criteriapo.criteria.maker import MakerOptions, make_criteria_dataset
from criteriapo.data.loading import load_data
from criteriapo.eval.criteria import evaluate_model
from criteriapo.pipeline import run_dpo

VARIANTS = {
    "vanilla": ("vanilla", []),
    "mini": ("mini", []),
    "finegrained": ("finegrained", []),
    "finegrained+cond": ("finegrained", ["dpo.condition_on_criterion=true"]),
}
RESULTS = Path(__file__).parent / "results"
HEADLINE = [
    "pass_rate",
    "reward_accuracy",
    "repetition_rate",
    "cut_off_rate",
    "unasked_format_rate",
    "mean_words",
]


def spread(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(runs: dict[str, list[dict]], families: list[str]) -> dict:
    """Per variant and metric: mean and spread over seeds."""
    out = {}
    for name, reports in runs.items():
        metrics = {
            "pass_rate": [r["pass_rate"] for r in reports],
            "reward_accuracy": [r["reward_accuracy"] for r in reports],
            "repetition_rate": [r["quality"]["repetition_rate"] for r in reports],
            "cut_off_rate": [r["quality"]["cut_off_rate"] for r in reports],
            "unasked_format_rate": [r["quality"]["unasked_format_rate"] for r in reports],
            "mean_words": [r["quality"]["mean_words"] for r in reports],
            **{f: [r["pass_by_criterion"].get(f, float("nan")) for r in reports] for f in families},
        }
        out[name] = {k: (statistics.fmean(v), spread(v), v) for k, v in metrics.items()}
    return out


def real_differences(summary: dict, keys: list[str]) -> list[str]:
    """Where two variants differ by more than their spreads added together."""
    names = list(summary)
    lines = []
    for k in keys:
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                (ma, sa, _), (mb, sb, _) = summary[a][k], summary[b][k]
                if math.isnan(ma) or math.isnan(mb) or abs(ma - mb) <= sa + sb:
                    continue
                hi, lo = (a, b) if ma > mb else (b, a)
                figures = f"{max(ma, mb):.3f} vs {min(ma, mb):.3f}, spreads {sa:.3f}, {sb:.3f}"
                lines.append(f"{k}: {hi} > {lo} ({figures})")
    return lines


def markdown(summary: dict, keys: list[str], n_held: int, seeds: list[int]) -> str:
    head = ["variant", *keys]
    lines = [
        (
            f"Held-out prompts: {n_held} (worded unlike training); seeds: {', '.join(map(str, seeds))}; "
            "mean ± spread (sample standard deviation over seeds)."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in summary.items():
        lines.append("| " + " | ".join([name, *(f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in keys)]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/smollm2-pipeline.yaml")
    p.add_argument("--model", default="runs/smollm2-pipeline/sft/model")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--held-out", type=float, default=0.5)
    p.add_argument("--data-seed", type=int, default=2, help="prompts unlike the main job's (seed 0)")
    p.add_argument("--out", default="runs/bench-recipes")
    p.add_argument(
        "--merge",
        type=Path,
        help="a results JSON of an earlier run with the same settings: its runs are kept, not rerun",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. dpo.beta=0.2")
    args = p.parse_args()
    model = args.model if Path(args.model).exists() else "smollm2"
    out = Path(args.out)
    cfg0 = load_config(args.config, args.overrides)
    # the config's sampling settings, with this benchmark's prompts, split and seed
    sampling = asdict(cfg0.dpo.criteria_data) | {
        "prompts": args.prompts,
        "held_out": args.held_out,
        "seed": args.data_seed,
    }
    opts = MakerOptions(**sampling)
    t0 = time.perf_counter()
    counts = make_criteria_dataset(out / "data", model, opts)
    print(f"data: {counts} from {model} in {time.perf_counter() - t0:.0f} s", flush=True)
    held = load_data(out / "data" / "heldout.jsonl").examples
    ev = {"max_new_tokens": cfg0.eval.max_new_tokens, "batch_size": 64}
    base = asdict(evaluate_model("start", model, held, **ev))
    runs = earlier_runs(args.merge, counts, setting(args)) if args.merge else {}
    for seed in args.seeds:  # every variant for one seed, then the next: a cut-short run still compares
        for name in args.variants:
            if any(r["seed"] == seed for r in runs.get(name, [])):
                continue
            recipe, extra = VARIANTS[name]
            cfg = load_config(
                args.config,
                [
                    *args.overrides,
                    f"output_dir={out}",
                    f"dpo.data.train=[{out / 'data' / 'train.jsonl'}]",
                    f"dpo.data.eval=[{out / 'data' / 'heldout.jsonl'}]",
                    f"dpo.recipe={recipe}",
                    f"dpo.train.seed={seed}",
                    "tracking.plots=false",
                    "tracking.progress=false",
                    *extra,
                ],
            )
            t1 = time.perf_counter()
            stage = run_dpo(cfg, model, out / f"{name}-seed{seed}", recipe)
            report = evaluate_model(
                name, str(stage.model_dir), held, reference=model, beta=cfg.dpo.beta, **ev
            )
            row = asdict(report) | {"seed": seed, "seconds": time.perf_counter() - t1}
            runs.setdefault(name, []).append(row)
            print(
                f"{name} seed {seed}: pass {row['pass_rate']:.3f}, reward acc {row['reward_accuracy']:.3f}, "
                f"loops {row['quality']['repetition_rate']:.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
        write_report(args, model, counts, len(held), base, runs)


def setting(args: argparse.Namespace) -> str:
    return f"Config {args.config} with {' '.join(args.overrides) or 'no overrides'}; "


def earlier_runs(path: Path, counts: dict, expected: str) -> dict[str, list[dict]]:
    """The runs of an earlier results file, refused unless its data and settings are this run's."""
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if earlier["counts"] != counts:
        raise SystemExit(f"{path}: made from other data ({earlier['counts']}, now {counts}); not merged")
    if earlier.get("setting", expected) != expected:
        raise SystemExit(f"{path}: other settings ({earlier['setting']!r}, now {expected!r}); not merged")
    print(
        f"kept from {path}: "
        + ", ".join(f"{k} seeds {[r['seed'] for r in v]}" for k, v in earlier["runs"].items())
    )
    return earlier["runs"]


def write_report(
    args: argparse.Namespace, model: str, counts: dict, n_held: int, base: dict, runs: dict
) -> None:
    """Print and write the table for the runs so far."""
    families = sorted({f for rs in runs.values() for r in rs for f in r["pass_by_criterion"]})
    summary = summarise(runs, families)
    keys = [*HEADLINE, *families]
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    table = setting(args) + f"{counts['train']} training prompts, data seed {args.data_seed}.\n\n"
    table += markdown(summary, keys, n_held, seeds)
    diffs = (
        real_differences(summary, keys)
        if len(seeds) > 1
        else ["one seed: no spread, so no difference can be called real"]
    )
    q = base["quality"]
    start = (
        f"Starting model ({model}): pass rate {base['pass_rate']:.3f}, loops {q['repetition_rate']:.3f}, "
        f"unasked format {q['unasked_format_rate']:.3f}, by criterion "
        + ", ".join(f"{k} {v:.2f}" for k, v in base["pass_by_criterion"].items())
    )
    text = "\n\n".join(
        [
            table,
            start,
            "Differences larger than the spreads added together:\n"
            + ("\n".join(f"- {d}" for d in diffs) or "- none: the recipes do not differ beyond seed noise"),
        ]
    )
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    tag = f"recipes-smollm2-{len(seeds)}seeds"  # the seeds finished so far
    (RESULTS / f"{tag}.md").write_text(text + "\n", encoding="utf-8")
    (RESULTS / f"{tag}.json").write_text(
        json.dumps(
            {"setting": setting(args), "counts": counts, "start": base, "runs": runs, "differences": diffs},
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
