"""Several processes under ``torchrun``: PyTorch's own engine, FSDP2.

One process per device (``torchrun --nproc-per-node N -m criteriapo ...``; NCCL on GPUs, gloo on
CPU). Each decoder block is sharded with ``fully_shard``, then the whole model, wrapped so that one
call computes per-sequence log-probs and the embedding and output weights are gathered for exactly
that call. The global batch keeps its meaning: ``train.batch_size`` examples per optimizer step in
all, each process taking every N-th of them, the loss divided by the totals of the whole step
summed over processes, so N processes with batch b each train like one process with batch N x b.
Metrics are summed over processes; only rank 0 prints and writes files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from criteriapo.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def init_world() -> World:
    """The process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=collective_timeout())
    return World(dist.get_rank(), dist.get_world_size(), local)


TIMEOUT_ENV = "CRITERIAPO_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600


def collective_timeout() -> timedelta:
    """How long a collective waits for the other processes before the run stops with an error:
    ``CRITERIAPO_COLLECTIVE_TIMEOUT`` seconds, one hour by default. NCCL's own default (10 minutes)
    is shorter than some waits a run has by design: processes wait while rank 0 writes a model
    folder or makes the criteria data with the model."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: give the timeout of collectives in seconds, above 0")
    return timedelta(seconds=seconds)


def device_for(world: World, device: str) -> str:
    if world.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return device


def check_batch(world: World, batch_size: int, micro_batch_size: int, where: str) -> None:
    if world.distributed and batch_size % (world.size * micro_batch_size):
        raise ConfigError(
            f"{where}.train.batch_size ({batch_size}) must be a multiple of the number of processes "
            f"({world.size}) x micro_batch_size ({micro_batch_size}): each process takes an equal share"
        )


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the log-prob wrapper around the whole model.
    With ``compute_dtype`` (bf16-mixed), parameters are gathered in it and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from criteriapo.losses.logprobs import LogpsModule

    mp = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype is not None
        else MixedPrecisionPolicy()
    )
    wrapped = model if isinstance(model, LogpsModule) else LogpsModule(model)
    for block in wrapped.get_decoder().layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(wrapped, mp_policy=mp)
    return wrapped


def gather_model(model: torch.nn.Module, source, lora, dtype, world: World) -> torch.nn.Module | None:
    """The whole trained model on rank 0 (None elsewhere): every process hands over its shards, rank 0
    loads them into a fresh, unsharded copy of the starting model (with the same LoRA layers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from criteriapo.models import load_model
    from criteriapo.models.lora import apply_lora

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return None
    plain = load_model(source, dtype=dtype, device="cpu")
    if lora.enabled:
        plain = apply_lora(plain, lora)
    plain.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()})
    return plain


def reshard(model: torch.nn.Module) -> None:
    """After a forward without backward, FSDP2 leaves the root's weights gathered: put them back in
    shards, so that the optimizer and the checkpoints see the sharded parameters."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum over processes (float64, so counts stay exact)."""
    if not world.distributed or not values:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, world: World) -> list:
    """Every process's ``obj`` (picklable, made by this program), in rank order."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def my_share(items: Sequence[T], world: World) -> list[T]:
    """This process's share of work split over processes: every N-th item from its rank."""
    return list(items[world.rank :: world.size])


def joined_shares(mine: list[T], world: World) -> list[T]:
    """The inverse of :func:`my_share`: every process's results, in the order of the items they came
    from, on every process (item ``i * N + r`` is the ``i``-th result of rank ``r``)."""
    return interleaved(all_gather_objects(mine, world)) if world.distributed else mine


def interleaved(shares: list[list[T]]) -> list[T]:
    """Shares made by :func:`my_share` (rank order), back in the order of the items."""
    return [s[i] for i in range(len(shares[0])) for s in shares if i < len(s)]


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
