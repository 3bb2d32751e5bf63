"""The held-out comparison under 2 gloo processes: each scores and answers its share of the
held-out data (no process waits while another generates), every process ends with the report one
process makes alone, and only rank 0 writes the comparison files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from criteriapo.data.loading import load_data
from criteriapo.distributed import World, interleaved, joined_shares, my_share
from criteriapo.eval.criteria import compare
from tests.helpers import write_criteria_data
from tests.train.test_scores_distributed import free_port


def _worker(rank: int, port: int, root: str, models: list, data: str) -> None:
    import torch.distributed as dist

    # an empty cache of its own, so that the pairs are scored here (in shares), not read from the
    # cache the one-process run filled
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CRITERIAPO_CACHE=f"{root}/cache2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        held = load_data(data).examples
        world = World(rank, 2, rank)
        reports = compare(models, held, Path(root) / "two", world, max_new_tokens=6, reference=models[0][1])
        with open(f"{root}/reports.{rank}.json", "w") as f:
            json.dump([r.__dict__ for r in reports], f)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def models(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    moved = tmp_path / "moved"
    shutil.copytree(tiny_llama_dir, moved)
    w = load_file(moved / "model.safetensors")
    save_file({k: v + 0.02 * (i % 3) for i, (k, v) in enumerate(w.items())}, moved / "model.safetensors")
    return [("ref", str(tiny_llama_dir)), ("moved", str(moved))]


def test_two_processes_each_evaluate_their_share_and_both_get_the_whole_report(tmp_path, models):
    data = write_criteria_data(tmp_path / "data", prompts=10, held_out=0.5) / "heldout.jsonl"
    held = load_data(data).examples
    assert len(held) % 2 == 1  # an odd count: the shares differ in length
    alone = compare(models, held, tmp_path / "one", max_new_tokens=6, reference=models[0][1])
    mp.spawn(_worker, args=(free_port(), str(tmp_path), models, str(data)), nprocs=2, join=True)
    want = json.loads(json.dumps([r.__dict__ for r in alone]))  # NaN and tuples as JSON has them
    for rank in (0, 1):
        got = json.loads((tmp_path / f"reports.{rank}.json").read_text())
        for g, w in zip(got, want, strict=True):
            assert [s["reply"] for s in g["samples"]] == [s["reply"] for s in w["samples"]]
            assert g["samples"] == w["samples"] and g["pass_by_criterion"] == w["pass_by_criterion"]
            assert g["quality"] == w["quality"]
            assert g["reward_accuracy"] == w["reward_accuracy"] and g["accuracy"] == w["accuracy"]
            assert g["reward_margin"] == pytest.approx(w["reward_margin"], abs=1e-5)
    files = {p.name for p in (tmp_path / "two").iterdir()}
    assert files == {"comparison.md", "comparison.json", "comparison.png"}
    table = (tmp_path / "two" / "comparison.md").read_text()
    assert table == (tmp_path / "one" / "comparison.md").read_text()


@pytest.mark.parametrize("n", [0, 1, 5, 6])
def test_shares_joined_give_back_the_items_in_order(n):
    items = list(range(n))
    shares = [my_share(items, World(r, 3, r)) for r in range(3)]
    assert sorted(x for s in shares for x in s) == items
    assert interleaved(shares) == items
    assert joined_shares(items, World()) == items
