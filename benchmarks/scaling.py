"""Speed, utilisation and peak memory against sequence length, ours and TRL, as a figure.

For each length, ``dpo_vs_trl.py`` runs every contender in its own process on pairs of about that
many tokens per sequence (prompt about half), with about ``--budget`` chosen + rejected tokens per
step (at least one pair); its counting is used as is: positions/s (each position of a pair once),
utilisation of the device's peak (useful FLOPs, attention included). A contender that fails at a
length (out of memory, say) is shown as failed there. Writes
benchmarks/results/scaling-<model>-<cpu|gpu>.{png,md,json}.

    .venv/bin/python benchmarks/scaling.py                              # CPU: the embedded model
    .venv/bin/python benchmarks/scaling.py --model llama3.2-1b --budget 16384   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--budget", type=int, default=4096, help="chosen + rejected tokens per step")
    p.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step")
    p.add_argument("--contenders", default="ours,ours-lean,trl-default,trl-precomputed")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    where = "gpu" if torch.cuda.is_available() else "cpu"
    table: dict[int, dict] = {}
    for length in map(int, args.lengths.split(",")):
        pairs = max(1, args.budget // (2 * length))
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                str(HERE / "dpo_vs_trl.py"),
                *("--model", args.model, "--length", str(length), "--pairs", str(pairs)),
                *("--steps", str(args.steps), "--contenders", args.contenders, "--out", tmp),
            ]
            subprocess.run(cmd, check=True)
            result = json.loads(next(Path(tmp).glob("*.json")).read_text())
        table[length] = {"pairs": pairs, **{c: r for c, r in result["results"].items()}}
        for r in table[length].values():
            if isinstance(r, dict):
                r.pop("runs", None)
        print(length, {c: round(r.get("positions_per_second", 0), 1) for c, r in result["results"].items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"scaling-{args.model}-{where}"
    (out / f"{name}.json").write_text(
        json.dumps({"args": vars(args), "machine": result["machine"], "by_length": table}, indent=2) + "\n"
    )
    contenders = args.contenders.split(",")
    lengths = sorted(table)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in contenders:
        ok = [n for n in lengths if "error" not in table[n][c]]
        speed.plot(ok, [table[n][c]["positions_per_second"] for n in ok], marker="o", label=c)
        memory.plot(ok, [table[n][c]["peak_gib"] for n in ok], marker="o", label=c)
    for ax, what in ((speed, "positions / s"), (memory, "peak memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"DPO on {args.model}, about {args.budget} tokens per step, {result['machine']['device']}")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    head = "| tokens per sequence | pairs per step | " + " | ".join(
        f"{c} positions/s | {c} util. | {c} GiB" for c in contenders
    )
    lines = [head + " |", "|" + "---|" * (2 + 3 * len(contenders))]
    for n in lengths:
        cells = [str(n), str(table[n]["pairs"])]
        for c in contenders:
            r = table[n][c]
            if "error" in r:
                cells += ["failed", "-", "-"]
                continue
            cells += [f"{r['positions_per_second']:.1f}", f"{r['utilisation']:.0%}", f"{r['peak_gib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    machine = result["machine"]
    lines += [
        "",
        (
            f"{machine['device']}, torch {machine['torch']}; utilisation over the {machine['peak_is']} "
            f"({machine['peak_flops'] / 1e9:.0f} GFLOP/s at the last length); counting: dpo_vs_trl.py"
        ),
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
