"""criteriapo eval: pass rates, quality guards, and reward accuracy against a reference."""

from __future__ import annotations

import math
import shutil

from criteriapo.data.loading import load_data
from criteriapo.eval.criteria import compare
from tests.helpers import write_criteria_data


def test_reward_accuracy_against_the_reference_and_dash_for_the_reference_itself(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    held = load_data(
        write_criteria_data(tmp_path / "data", prompts=8, held_out=0.5) / "heldout.jsonl"
    ).examples
    moved = tmp_path / "moved"
    shutil.copytree(tiny_llama_dir, moved)
    w = load_file(moved / "model.safetensors")
    w = {k: v + 0.02 * (i % 3) for i, (k, v) in enumerate(w.items())}
    save_file(w, moved / "model.safetensors", metadata={"format": "pt"})
    ref, other = compare(
        [("ref", str(tiny_llama_dir)), ("moved", str(moved))],
        held,
        tmp_path / "out",
        max_new_tokens=4,
        reference=str(tiny_llama_dir),
    )
    assert ref.reward_accuracy is None and all(math.isnan(v) for v in ref.accuracy_by_criterion.values())
    assert 0.0 <= other.reward_accuracy <= 1.0 and other.reward_margin != 0.0
    assert not any(math.isnan(v) for v in other.accuracy_by_criterion.values())
    assert "as_asked" in other.accuracy_by_criterion  # the made data's unasked-format rating
    assert set(other.quality) >= {"repetition_rate", "cut_off_rate", "unasked_format_rate", "mean_words"}
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "| ref | - |" in table and "reward against the reference" in table
