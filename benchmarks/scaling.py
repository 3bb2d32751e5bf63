"""Speed, utilisation and peak memory against sequence length, ours and TRL, as a figure.

For each length, ``dpo_vs_trl.py`` runs every contender in its own process on pairs of about that
many tokens per sequence (prompt about half), with about ``--budget`` chosen + rejected tokens per
step (at least one pair), ``--rounds`` times in alternation (a new process each time; the figures are
over every round's timed steps, so a contender's are spread over the machine's drifts); its counting
is used as is: positions/s (each position of a pair once),
utilisation of the device's peak (useful FLOPs, attention included). A contender that fails at a
length (out of memory, say) is shown as failed there. Writes
benchmarks/results/scaling-<model>-<cpu|gpu>.{png,md,json}.

    .venv/bin/python benchmarks/scaling.py                              # CPU: the embedded model
    .venv/bin/python benchmarks/scaling.py --steps 1 --rounds 2         # each timed step in its own process
    .venv/bin/python benchmarks/scaling.py --model llama3.2-1b --budget 16384   # on a GPU
    .venv/bin/python benchmarks/scaling.py --render     # the table and figure again from the results file
    .venv/bin/python benchmarks/scaling.py --readme     # the README's table from the results file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from dpo_vs_trl import rates_text

HERE = Path(__file__).parent
# the README's names for the contenders (:func:`readme_table`)
LABELS = {
    "ours": "ours",
    "ours-no-checkpointing": "no checkpointing",
    "ours-fast": "speed first",
    "ours-lean": "least memory",
    "trl-default": "TRL default",
    "trl-precomputed": "TRL fastest (reference precomputed)",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--budget", type=int, default=4096, help="chosen + rejected tokens per step")
    p.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (dpo_vs_trl.py's --warmup)")
    p.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds of every contender, each in a new process"
    )
    p.add_argument("--contenders", default="ours,ours-lean,trl-default,trl-precomputed")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--merge", action="store_true", help="keep the other lengths of the results file")
    p.add_argument(
        "--render", action="store_true", help="only write the table and figure from the results file"
    )
    p.add_argument(
        "--readme", action="store_true", help="only print the README's table from the results file"
    )
    args = p.parse_args()
    where = "gpu" if torch.cuda.is_available() else "cpu"
    path = Path(args.out) / f"scaling-{args.model}-{where}.json"
    if args.readme:  # the README's table is the CPU run's, on any machine
        return print(readme_table(json.loads(path.with_name(f"scaling-{args.model}-cpu.json").read_text())))
    if args.render:
        saved = json.loads(path.read_text())
        table = {int(n): row for n, row in saved["by_length"].items()}
        return render(table, saved["args"], saved["machine"], path)
    table = _earlier(path) if args.merge else {}
    for length in map(int, args.lengths.split(",")):
        pairs = max(1, args.budget // (2 * length))
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                str(HERE / "dpo_vs_trl.py"),
                *("--model", args.model, "--length", str(length), "--pairs", str(pairs)),
                *("--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds)),
                *("--contenders", args.contenders, "--out", tmp),
            ]
            subprocess.run(cmd, check=True)
            result = json.loads(next(Path(tmp).glob("*.json")).read_text())
        when = {
            "date": time.strftime("%Y-%m-%d"),
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
        }
        table[length] = {"pairs": pairs, **when, **result["results"]}
        for r in table[length].values():
            if isinstance(r, dict):
                r.pop("runs", None)
        print(length, {c: round(r.get("positions_per_second", 0), 1) for c, r in result["results"].items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"args": vars(args), "machine": result["machine"], "by_length": table}, indent=2) + "\n"
    )
    render(table, vars(args), result["machine"], path)


def _contenders(table: dict[int, dict], args: dict) -> list[str]:
    """The run's contenders in its order, then any that only rows merged from earlier runs have."""
    found = (c for n in table for c, r in table[n].items() if isinstance(r, dict))
    return list(dict.fromkeys([*args["contenders"].split(","), *found]))


def readme_table(saved: dict) -> str:
    """The README's table of a results file: a row per length, a cell per contender (positions/s,
    utilisation, peak memory, and the matmul rate its utilisation is over), then each of ours
    against the faster TRL setting that ran (as measured, and per matmul rate) and ours' memory
    against TRL's default."""
    table = {int(n): row for n, row in saved["by_length"].items()}
    contenders = _contenders(table, saved["args"])
    ours = [c for c in contenders if c.startswith("ours")]
    trl = tuple(c for c in contenders if c.startswith("trl-"))
    label = [LABELS.get(c, c) for c in contenders]
    names = [LABELS.get(c, c) for c in ours]
    head = [
        "tokens per sequence (pairs per step)",
        f"{label[0]}: positions/s, utilisation, peak (matmul GFLOP/s)",
        *label[1:],
        f"{names[0]} / fastest TRL: positions/s (per matmul rate)",
        *(f"{n} / fastest TRL" for n in names[1:]),
        "memory against TRL default: " + ", ".join(names),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted(table):
        cells = [f"{n} ({table[n]['pairs']})"] + [_cell(table[n].get(c)) for c in contenders]
        ratios = {c: _ratios(table[n], c, trl) for c in ours}
        cells += [ratios[c][0] for c in ours] + [", ".join(ratios[c][1] for c in ours)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(r: dict | None) -> str:
    """One contender at one length in the README's table."""
    if r is None:
        return "not run"
    if "error" in r:
        return "killed (exit -9)" if "(exit -9)" in r["error"] else "failed"
    rate = f" ({r['peak_flops'] / 1e9:.0f})" if "peak_flops" in r else ""
    return f"{r['positions_per_second']:.1f}, {r['utilisation']:.0%}, {r['peak_gib']:.2f} GiB{rate}"


def render(table: dict[int, dict], args: dict, machine: dict, path: Path) -> None:
    """The figure and the markdown table beside the results file ``path``."""
    contenders = _contenders(table, args)
    trl = tuple(c for c in contenders if c.startswith("trl-"))
    lengths = sorted(table)
    _figure(
        table,
        contenders,
        lengths,
        f"DPO on {args['model']}, about {args['budget']} tokens per step, {machine['device']}",
        path.with_suffix(".png"),
    )
    head = "| tokens per sequence | pairs per step | matmul GFLOP/s | " + " | ".join(
        f"{c} positions/s | {c} util. | {c} GiB" for c in contenders
    )
    ours = [c for c in contenders if c.startswith("ours")]
    ratios = "".join(
        f" | {c} / fastest TRL: positions/s (per matmul rate) | {c} / TRL default: GiB" for c in ours
    )
    lines = [head + ratios + " |", "|" + "---|" * (3 + 3 * len(contenders) + 2 * len(ours))]
    for n in lengths:
        row = [r for r in table[n].values() if isinstance(r, dict)]
        cells = [
            str(n),
            str(table[n]["pairs"]),
            rates_text(row, machine["peak_flops"]).removesuffix(" GFLOP/s"),
        ]
        for c in contenders:
            r = table[n].get(c, {"error": "not run"})
            if "error" in r:
                cells += ["failed" if c in table[n] else "-", "-", "-"]
                continue
            cells += [f"{r['positions_per_second']:.1f}", f"{r['utilisation']:.0%}", f"{r['peak_gib']:.2f}"]
        against = [r for c in ours for r in _ratios(table[n], c, trl)]
        lines.append("| " + " | ".join(cells + against) + " |")
    dates = ", ".join(f"{n}: {table[n].get('date', 'earlier')}" for n in lengths)
    # warm-up + timed steps x rounds per length (rows merged from another run may differ; older rows:
    # this run's; rows from before --warmup had one warm-up step)
    timing = {
        n: f"{table[n].get('warmup', 1)} + {table[n].get('steps', args['steps'])} x "
        f"{table[n].get('rounds', args.get('rounds', 1))}"
        for n in lengths
    }
    timed = (
        next(iter(timing.values()))
        if len(set(timing.values())) == 1
        else ", ".join(f"{n}: {t}" for n, t in timing.items())
    )
    lines += [
        "",
        (
            f"{machine['device']}, torch {machine['torch']}; utilisation over the {machine['peak_is']} "
            f"(the matmul column; a range: each contender's own); warm-up + timed steps x rounds per "
            f"contender: {timed}; measured {dates} "
            "(a row measured earlier: over one rate the driver measured for its whole run); "
            "counting: dpo_vs_trl.py. "
            "Ratios: each of ours against the faster TRL setting, as measured and with each "
            "contender's positions/s over its own matmul rate in brackets (the machine's speed drifts "
            "between contenders); memory against TRL's default setting."
        ),
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ratios(row: dict, name: str, trl_settings: tuple[str, ...] = ()) -> list[str]:
    """Contender ``name`` against the faster TRL setting (positions/s, as measured and per each one's
    matmul rate) and against TRL's default (peak memory), "-" where one of them did not run. The
    speed says which TRL setting it is against when one of ``trl_settings`` failed or did not run."""
    ok = {c: r for c, r in row.items() if isinstance(r, dict) and "error" not in r}
    trl = [{**r, "name": c} for c, r in ok.items() if c.startswith("trl-")]
    if name not in ok:
        return ["-", "-"]
    ours = ok[name]
    speed = "-"
    if trl:
        fastest = max(trl, key=lambda r: r["positions_per_second"])
        speed = f"{ours['positions_per_second'] / fastest['positions_per_second']:.2f}x"
        if "peak_flops" in ours and "peak_flops" in fastest:
            per_rate = (ours["positions_per_second"] / ours["peak_flops"]) / (
                fastest["positions_per_second"] / fastest["peak_flops"]
            )
            speed += f" ({per_rate:.2f}x)"
        if any(c not in ok for c in trl_settings):
            speed += f" against {LABELS.get(fastest['name'], fastest['name'])}"
    memory = f"{ours['peak_gib'] / ok['trl-default']['peak_gib']:.2f}x" if "trl-default" in ok else "-"
    return [speed, memory]


def _figure(
    table: dict[int, dict], contenders: list[str], lengths: list[int], title: str, path: Path
) -> None:
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in contenders:
        ok = [n for n in lengths if "error" not in table[n].get(c, {"error": "not run"})]
        speed.plot(ok, [table[n][c]["positions_per_second"] for n in ok], marker="o", label=c)
        memory.plot(ok, [table[n][c]["peak_gib"] for n in ok], marker="o", label=c)
    for ax, what in ((speed, "positions / s"), (memory, "peak memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _earlier(path: Path) -> dict[int, dict]:
    """The lengths of an earlier results file, each contender with the rate it was measured against
    (files written before rates were measured per contender hold one for the whole run)."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    table = {int(n): row for n, row in earlier["by_length"].items()}
    for row in table.values():
        for r in row.values():
            if isinstance(r, dict) and "error" not in r:
                r.setdefault("peak_flops", earlier["machine"]["peak_flops"])
    return table


if __name__ == "__main__":
    main()
