"""Reference scores under FSDP2 are split across processes and gathered: each of 2 gloo processes
scores every other micro-batch of a sharded model (the one that runs out repeats a forward, as a
sharded forward is a collective), and both end with the scores one process makes alone."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from criteriapo.data.records import RowRef
from criteriapo.data.tokenize import TokenizedPair
from criteriapo.distributed import World, collective_timeout, shard
from criteriapo.errors import ConfigError
from criteriapo.train.scores import score_pairs
from tests.train.test_loop import tiny_model

PAIRS = 5  # 3 micro-batches of 2: the second process scores one and repeats one


def pairs() -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 40, (n,), generator=g).tolist()

    return [TokenizedPair(ids(3 + i), ids(2 + i % 3), ids(4 - i % 2), RowRef("t", i)) for i in range(PAIRS)]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sharded = shard(tiny_model())
        scores = score_pairs(sharded, pairs(), 0, micro_batch_size=2, world=World(rank, 2, rank))
        torch.save({"chosen": scores.chosen.logps, "rejected": scores.rejected.logps}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_score_each_half_and_both_get_all(tmp_path):
    alone = score_pairs(tiny_model(), pairs(), 0, micro_batch_size=2)
    out = str(tmp_path / "scores")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(got["chosen"], alone.chosen.logps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["rejected"], alone.rejected.logps, atol=1e-5, rtol=1e-5)


def test_the_collective_timeout_is_explicit(monkeypatch):
    monkeypatch.delenv("CRITERIAPO_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == 3600
    monkeypatch.setenv("CRITERIAPO_COLLECTIVE_TIMEOUT", "90")
    assert collective_timeout().total_seconds() == 90
    for bad in ("0", "soon"):
        monkeypatch.setenv("CRITERIAPO_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="CRITERIAPO_COLLECTIVE_TIMEOUT"):
            collective_timeout()
