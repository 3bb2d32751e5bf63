"""The README's scaling table is made from the committed results file, not typed in."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # for scaling.py's own imports; appended, so it shadows nothing
_spec = importlib.util.spec_from_file_location("benchmarks_scaling", ROOT / "benchmarks" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)
readme_table = scaling.readme_table


def test_scaling_table_is_the_results_file():
    saved = json.loads((ROOT / "benchmarks" / "results" / "scaling-smollm2-cpu.json").read_text())
    table = readme_table(saved)
    # the whole table, a blank line before and after, so a row left over from before fails too
    assert f"\n\n{table}\n\n" in (ROOT / "README.md").read_text(), (
        "README.md's scaling table differs from benchmarks/results/scaling-smollm2-cpu.json: "
        "put in the output of `.venv/bin/python benchmarks/scaling.py --readme`"
    )


def test_scaling_table_shows_failed_and_missing_contenders_and_whom_ours_are_against():
    row = {"positions_per_second": 10.0, "utilisation": 0.5, "peak_gib": 2.0, "peak_flops": 2e11}
    saved = {
        "args": {"contenders": "ours,trl-default,trl-precomputed"},
        "by_length": {
            "64": {
                "pairs": 2,
                "ours": row,
                "trl-default": {**row, "positions_per_second": 4.0, "peak_gib": 8.0},
                "trl-precomputed": {"error": "trl-precomputed failed (exit -9):\n"},
            },
            "16": {
                "pairs": 8,
                "ours": row,
                "trl-default": {**row, "positions_per_second": 4.0, "peak_gib": 8.0},
            },
            "32": {
                "pairs": 4,
                "ours": row,
                "trl-default": {**row, "positions_per_second": 4.0, "peak_gib": 8.0},
                "trl-precomputed": {**row, "positions_per_second": 5.0, "peak_flops": 1e11},
            },
        },
    }
    lines = readme_table(saved).split("\n")
    assert lines[0] == (
        "| tokens per sequence (pairs per step) | ours: positions/s, utilisation, peak (matmul GFLOP/s) "
        "| TRL default | TRL fastest (reference precomputed) "
        "| ours / fastest TRL: positions/s (per matmul rate) | memory against TRL default: ours |"
    )
    assert lines[2] == (
        "| 16 (8) | 10.0, 50%, 2.00 GiB (200) | 4.0, 50%, 8.00 GiB (200) | not run "
        "| 2.50x (2.50x) against TRL default | 0.25x |"
    )
    assert lines[3] == (
        "| 32 (4) | 10.0, 50%, 2.00 GiB (200) | 4.0, 50%, 8.00 GiB (200) | 5.0, 50%, 2.00 GiB (100) "
        "| 2.00x (1.00x) | 0.25x |"
    )
    assert lines[4] == (
        "| 64 (2) | 10.0, 50%, 2.00 GiB (200) | 4.0, 50%, 8.00 GiB (200) | killed (exit -9) "
        "| 2.50x (2.50x) against TRL default | 0.25x |"
    )
