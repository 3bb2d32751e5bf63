"""The criteria data under 2 gloo processes: each samples its share of the batches (no process waits
while another samples), and the files are those one process makes alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.multiprocessing as mp

from criteriapo.config import CriteriaDataConfig
from criteriapo.distributed import World
from criteriapo.stages.data import data_paths
from tests.train.test_scores_distributed import free_port

# 10 prompts of 2 samples in batches of 4 sequences: 5 batches of 2 prompts, 3 for rank 0 and 2 for rank 1
MAKER = CriteriaDataConfig(prompts=10, samples=2, held_out=0.3, max_new_tokens=8, batch_size=4)


def _worker(rank: int, port: int, root: str, model: str) -> None:
    import torch.distributed as dist

    from criteriapo.criteria import maker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CRITERIAPO_CACHE=f"{root}/cache2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sampled = []
    real = maker._sample_batches

    def spy(model_path, batches, opts, device, shown):  # records the batches this process samples
        sampled.extend(first for first, _ in batches)
        return real(model_path, batches, opts, device, shown)

    maker._sample_batches = spy
    try:
        world = World(rank, 2, rank)
        first = data_paths(["builtin:criteria-train", "builtin:criteria-heldout"], model, MAKER, world=world)
        again = data_paths(["builtin:criteria-train", "builtin:criteria-heldout"], model, MAKER, world=world)
        out = {"paths": [str(p) for p in first], "again": [str(p) for p in again], "sampled": sampled}
        out["files"] = [Path(p).read_text() for p in first]
        Path(f"{root}/made.{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_two_processes_sample_their_share_and_make_the_files_one_process_makes(
    tmp_path, tiny_llama_dir, monkeypatch
):
    monkeypatch.setenv("CRITERIAPO_CACHE", str(tmp_path / "cache1"))
    alone = data_paths(["builtin:criteria-train", "builtin:criteria-heldout"], str(tiny_llama_dir), MAKER)
    mp.spawn(_worker, args=(free_port(), str(tmp_path), str(tiny_llama_dir)), nprocs=2, join=True)
    made = [json.loads((tmp_path / f"made.{r}.json").read_text()) for r in (0, 1)]
    # whole batches (of 2 prompts), every other one: rank 0 the 1st, 3rd and 5th, rank 1 the others
    assert made[0]["sampled"] == [0, 4, 8] and made[1]["sampled"] == [2, 6]  # and not again when made
    for m in made:
        assert m["files"] == [p.read_text() for p in alone]
        assert m["again"] == m["paths"] and Path(m["paths"][0]).parent.parent == tmp_path / "cache2" / "data"
    assert len(list((tmp_path / "cache2" / "samples").glob("*.json"))) == 1  # written once, by rank 0
