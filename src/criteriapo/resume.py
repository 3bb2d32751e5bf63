"""A run folder's owner, and going on from a stage's checkpoints: one run at a time per folder, a
finished run replaced only when asked, an unfinished one never buried; a resumed run checked to be
the same run (config and data), and the metrics logged after the checkpoint trimmed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from criteriapo.config import Config, resume_free_keys, to_dict
from criteriapo.distributed import World, barrier
from criteriapo.errors import CriteriaPOError
from criteriapo.fsutil import run_lock
from criteriapo.train.checkpoint import Checkpoint, Checkpointer, CheckpointError, fingerprint

log = logging.getLogger(__name__)

# keys that may change between a run and its resumption, as declared in the config (_resume_free)
FREE_KEYS = resume_free_keys()


class FinishedRun(CriteriaPOError):
    """A new run would replace a finished one's model."""


@contextlib.contextmanager
def claim_run_folder(
    out: Path, stages: Sequence[Path], resume: bool = False, overwrite: bool = False
) -> Iterator[None]:
    """Own ``out`` for this run (see :func:`criteriapo.fsutil.run_lock`; under torchrun rank 0 holds
    it for all), and refuse to replace a finished stage's model unless ``overwrite`` (or ``resume``,
    which goes on from its checkpoints)."""
    main = os.environ.get("RANK", "0") == "0"
    with run_lock(out) if main else contextlib.nullcontext():
        done = [s for s in stages if (s / "model").is_dir()]
        if done and not (resume or overwrite):
            raise FinishedRun(
                f"{done[0]} holds a finished run (its model: {done[0] / 'model'}), which this run would "
                "replace. Pass --overwrite to replace it, or choose another output_dir"
            )
        new = [s for s in stages if not s.exists()]
        try:
            yield
        except BaseException:
            for s in new if main else ():  # a run refused by its checks leaves no empty stage folder
                with contextlib.suppress(OSError):
                    s.rmdir()
            raise


def guard_unfinished(folder: Path, resume: bool, world: World) -> None:
    """A fresh start must not bury an interrupted run: say how to go on or how to start again."""
    if resume or not folder.is_dir():
        return
    found = Checkpointer(folder, {}, world=world).valid()
    if found and found[-1].step < found[-1].info.get("total_steps", 0):
        raise CheckpointError(
            f"{folder} holds an unfinished run (step {found[-1].step} of {found[-1].info['total_steps']}): "
            f"pass --resume to go on from it, or delete {folder} to start again"
        )
    barrier(world)  # every process has looked before rank 0 clears it
    if found and world.main:  # a finished run is being redone: its checkpoints would mix with the new
        shutil.rmtree(folder)
    barrier(world)


def stage_checkpointer(
    cfg: Config,
    name: str,
    stage: Any,
    model_spec: str,
    run_dir: Path,
    train: list,
    world: World,
    resume: bool,
    **run: Any,
) -> tuple[Checkpointer, Checkpoint | None, dict | None]:
    """The stage's checkpointer and, with ``resume``, the checkpoint to go on from (checked), or the
    record of the stage finished there (checked; see :func:`record_finished`)."""
    config = {"model": {**to_dict(cfg.model), "name_or_path": model_spec}, name: to_dict(stage), **run}
    info = {"config": config, "data": fingerprint(train), "examples": len(train)}
    every, keep = stage.train.checkpoint_every, stage.train.keep_checkpoints
    ck = Checkpointer(run_dir / "checkpoints", info, every, keep, world=world)
    latest = ck.latest() if resume else None
    if resume and latest is None and (done := finished_stage(run_dir, ck)) is not None:
        log.warning("%s finished before (its model: %s): nothing to train again", run_dir, run_dir / "model")
        return ck, None, done
    if latest is not None:
        ck.check_compatible(latest, FREE_KEYS)
        if world.main:
            final = latest.step >= latest.info.get("total_steps", 0)
            trim_metrics(run_dir / "metrics.jsonl", latest.step, drop_final_eval=final)
            log.warning("resuming from %s (step %d)", latest.path, latest.step)
    elif resume and world.main:
        log.warning("no checkpoint in %s: starting from the beginning", ck.folder)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return ck, latest, None


FINISHED = "finished.json"


def record_finished(
    run_dir: Path, ck: Checkpointer, results: dict, keep_checkpoint: bool, world: World
) -> None:
    """Once the model is exported: ``finished.json`` records what ran (config and data, as a
    checkpoint does) and its results, and the checkpoints, which only a resume would need, are
    deleted unless kept. A later ``--resume`` of the same run then reuses the stage."""
    if world.main:
        tmp = run_dir / f".{FINISHED}.tmp"
        tmp.write_text(json.dumps({"run": ck.run, **results}), encoding="utf-8")
        os.replace(tmp, run_dir / FINISHED)
        if not keep_checkpoint:
            shutil.rmtree(ck.folder, ignore_errors=True)
    barrier(world)


def finished_stage(run_dir: Path, ck: Checkpointer) -> dict | None:
    """The record of the stage finished in ``run_dir``, refused when its config or data differ from
    this run's; None when none finished there."""
    path = run_dir / FINISHED
    if not path.is_file() or not (run_dir / "model").is_dir():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    ck.check_run(record["run"], path, FREE_KEYS)
    return record


def trim_metrics(path: Path, step: int, drop_final_eval: bool = False) -> None:
    """Drop the lines logged after ``step``: the resumed run logs those steps again (and, resuming
    from the last step, the final evaluation, which runs again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
            at = row.get("step", 0)
            if at < step or (at == step and not (drop_final_eval and "loss" not in row)):
                keep.append(line)
        except ValueError:
            break  # a line cut short by the kill: nothing after it is whole
    path.write_text("".join(keep), encoding="utf-8")
