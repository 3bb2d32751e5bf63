"""Helpers for writing test data files."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be objects (dumped as JSON) or raw bytes/str lines written as they are."""
    with path.open("wb") as f:
        for r in rows:
            if isinstance(r, bytes):
                f.write(r.rstrip(b"\n") + b"\n")
            elif isinstance(r, str):
                f.write(r.encode() + b"\n")
            else:
                f.write(json.dumps(r).encode() + b"\n")
    return path


def write_criteria_data(folder: Path, prompts: int = 12, held_out: float = 0.25) -> Path:
    """Multi-criteria ``train.jsonl`` and ``heldout.jsonl`` made by the maker's own prompts and
    scoring, with three written replies per prompt standing in for a model's samples (a tiny random
    model writes no sentences to score)."""
    from criteriapo.criteria.maker import draw_prompts, make_record

    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"train": [], "heldout": []}
    for d in draw_prompts(prompts, seed=0, held_out=held_out):
        t = d.topic
        replies = [
            f"Sure, {t} is lovely. People enjoy {t} a lot, and it has a long history. Done",
            f"{t} matters to many people. It is very old.".capitalize(),
            f"I like {t}.",
        ]
        rows[d.split].append(make_record(d, [{"text": r, "cut_off": False} for r in replies], "written"))
    for split, rs in rows.items():
        write_jsonl(folder / f"{split}.jsonl", rs)
    return folder


def train_dpo_briefly(model_dir: Path, entry: str, out: Path, *overrides: str) -> int:
    """``criteriapo dpo`` for two steps of two pairs on the data ``entry`` names (no eval data);
    returns the exit status. The model folder is ``out/dpo/model``."""
    from criteriapo.cli import main

    return main(
        [
            "dpo",
            f"model.name_or_path={model_dir}",
            f'dpo.data.train=["{entry}"]',
            "dpo.data.eval=[]",
            "dpo.train.batch_size=2",
            "dpo.train.micro_batch_size=2",
            "dpo.train.max_steps=2",
            f"output_dir={out}",
            *overrides,
        ]
    )
