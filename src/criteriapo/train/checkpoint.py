"""Checkpoints: written atomically every N steps and at the end, the last K kept, checked on resume.

A checkpoint is a folder ``checkpoints/step-00000040`` holding

- ``model.safetensors``: the model's weights (tied weights stored once);
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``<param>.<name>``;
- ``extra.safetensors``: the torch RNG states and the stage's own tensors (DPO reference scores);
- ``trainer.json``: step and counters, data position, Python RNG, optimizer settings, last metrics,
  and what the run was: its config and a fingerprint of its data;
- ``manifest.json``, written last: the size and SHA-256 of every other file.

It is written into a hidden folder beside the others, flushed to disk, then renamed into place, so a
process killed at any moment leaves either the whole checkpoint or none. On resume, folders whose
manifest is missing or whose files do not match it are reported and passed over. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from criteriapo import faults
from criteriapo.distributed import SINGLE, World, all_sum, barrier
from criteriapo.errors import CriteriaPOError
from criteriapo.fsutil import atomic_dir, fsync_dir, write_error

log = logging.getLogger(__name__)

FORMAT = 1
FILES = ("model.safetensors", "optimizer.safetensors", "extra.safetensors", "trainer.json")


class CheckpointError(CriteriaPOError):
    """A checkpoint cannot be written, or a run cannot be resumed from one."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    info: dict[str, Any]  # trainer.json

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / name)


def fingerprint(examples: Any) -> str:
    """SHA-256 of the training examples as the model sees them (token ids, labels, weights, tags),
    in order; where a row came from (file, line) does not count."""
    h = hashlib.sha256()
    for e in examples:
        fields = {k: v for k, v in vars(e).items() if k != "source"}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Checkpointer:
    """Writes a trainer's state under ``folder``, keeps the newest ``keep`` and finds the latest
    valid one. ``run`` (the config and the data fingerprint) is stored with each and must match on
    resume; keys listed in ``free_keys`` may change between the run and its resumption."""

    def __init__(
        self,
        folder: Path,
        run: dict[str, Any],
        every: int | None = None,
        keep: int = 2,
        world: World = SINGLE,
    ):
        self.folder, self.run, self.every, self.keep, self.world = Path(folder), run, every, keep, world

    # -- writing ------------------------------------------------------------------------------
    def due(self, step: int, total: int) -> bool:
        return step == total or bool(self.every and step % self.every == 0)

    def save(self, trainer: Any, extra: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the trainer's state as ``step-N`` (atomically), then drop all but the newest ``keep``.
        On a write failure the partial folder is removed and the earlier checkpoints stay as they were.
        Under several processes every one gathers the state; rank 0 writes it."""
        step = trainer.state.step
        dest = self.folder / f"step-{step:08d}"
        weights, optim, layout = _gather(trainer)
        failure = None
        if self.world.main:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with atomic_dir(dest) as tmp:
                    self._write(tmp, trainer, weights, optim, layout, extra or {})
                    faults.point("checkpoint-publish")
            except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own
                kept = self.valid()
                failure = CheckpointError(
                    f"could not write checkpoint {dest}: {write_error(e)}. "
                    + (f"The previous checkpoint {kept[-1].path} is intact. " if kept else "")
                    + "Free disk space or fix the folder's permissions, then resume with --resume"
                )
                failure.__cause__ = e
            else:
                self._rotate()
        if all_sum([float(failure is not None)], self.world)[0]:  # every process stops together
            raise failure or CheckpointError(f"rank 0 could not write checkpoint {dest}")
        barrier(self.world)
        return dest

    def _write(
        self,
        tmp: Path,
        trainer: Any,
        weights: Any,
        optim_state: dict[str, Any],
        layout: str,
        extra: dict[str, torch.Tensor],
    ) -> None:
        state = trainer.state_dict(model=False, optimizer=False)
        trainable_only = any(not p.requires_grad for p in trainer.model.parameters())  # LoRA: base fixed
        aliases: dict[str, str] = {}
        if isinstance(weights, dict):
            weights, aliases = _dedupe(weights)
            save_file(weights, str(tmp / "model.safetensors"))
        else:  # one process: the module itself (tied weights stored once)
            save_model(weights, str(tmp / "model.safetensors"))
        faults.point("checkpoint-write")
        optim, scalars = _flatten_optimizer(optim_state)
        save_file(optim, str(tmp / "optimizer.safetensors"))
        rng = state["rng"]
        tensors = {"rng.torch": rng["torch"], **{f"rng.cuda.{i}": t for i, t in enumerate(rng["cuda"])}}
        save_file(
            {**tensors, **{f"extra.{k}": v.contiguous() for k, v in extra.items()}},
            str(tmp / "extra.safetensors"),
        )
        info = {
            "format": FORMAT,
            "layout": layout,
            "processes": self.world.size,
            "step": trainer.state.step,
            "train_state": state["train_state"],
            "data_order": state["data_order"],
            "python_rng": _python_rng_to_json(rng["python"]),
            "param_groups": [  # a tensor setting (torchao keeps lr as one) is written as its number
                {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()}
                for g in optim_state["param_groups"]
            ],
            "optimizer_scalars": scalars,
            "last_metrics": trainer.last_metrics,
            "total_steps": trainer.total_steps,
            "trainable_only": trainable_only,
            "aliases": aliases,
            "run": self.run,
        }
        (tmp / "trainer.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        manifest = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    def _rotate(self) -> None:
        """Drop all but the newest ``keep``; failing to delete an old one only warns."""
        folders = sorted(p for p in self.folder.glob("step-*") if p.is_dir())
        try:
            for old in folders[: max(0, len(folders) - self.keep)]:
                trash = old.parent / f".trash-{old.name}"
                os.rename(old, trash)  # gone from view in one step, then deleted at leisure
                faults.point("checkpoint-rotate")
                shutil.rmtree(trash, ignore_errors=True)
            fsync_dir(self.folder)
        except OSError as e:
            log.warning("could not delete an old checkpoint in %s: %s", self.folder, write_error(e))

    # -- reading ------------------------------------------------------------------------------
    def valid(self, report: bool = False) -> list[Checkpoint]:
        """The complete checkpoints, oldest first. Leftovers of interrupted writes are removed;
        broken checkpoints are passed over (with a warning when ``report``)."""
        if not self.folder.is_dir():
            return []
        if self.world.main:
            for junk in [*self.folder.glob(".tmp-*"), *self.folder.glob(".trash-*")]:
                shutil.rmtree(junk, ignore_errors=True)
        out = []
        for path in sorted(p for p in self.folder.glob("step-*") if p.is_dir()):
            problem = _problem(path)
            if problem is None:
                info = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
                out.append(Checkpoint(path, info["step"], info))
            elif report:
                log.warning("passing over checkpoint %s: %s", path, problem)
        return out

    def latest(self) -> Checkpoint | None:
        found = self.valid(report=True)
        return found[-1] if found else None

    def check_compatible(self, ckpt: Checkpoint, free_keys: tuple[str, ...] = ()) -> None:
        """Refuse to resume when the config or the data differ from the checkpoint's, saying what."""
        self.check_run(ckpt.info["run"], ckpt.path, free_keys)

    def check_run(self, old: dict, where: Any, free_keys: tuple[str, ...] = ()) -> None:
        """Refuse to go on from the run recorded in ``where`` (a checkpoint, or a finished stage's
        record) when its config or data differ from this run's, saying what."""
        new = self.run
        if old.get("data") != new.get("data"):
            raise CheckpointError(
                f"cannot resume from {where}: the training data differ from the run's "
                f"({old.get('examples')} examples then, {new.get('examples')} now; fingerprint "
                f"{str(old.get('data'))[:12]} then, {str(new.get('data'))[:12]} now). Resume with the "
                "same data files and tokenization, or start a new run in another output_dir"
            )
        diffs = [
            f"{k}: {a!r} then, {b!r} now"
            if _has(new.get("config", {}), k)
            else f"{k}: {a!r} then, a setting this version no longer has (renamed or removed, see the README)"
            for k, a, b in _diff(old.get("config", {}), new.get("config", {}))
            if not any(k == f or k.startswith(f + ".") for f in free_keys)
        ]
        if diffs:
            raise CheckpointError(
                f"cannot resume from {where}: the config differs from the run's: "
                + "; ".join(diffs[:10])
                + ("; ..." if len(diffs) > 10 else "")
                + ". Restore those values, or start a new run in another output_dir"
            )

    def restore(self, trainer: Any, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        """Load ``ckpt`` into ``trainer``; returns the stage's extra tensors."""
        info = ckpt.info
        layout = "sharded" if self.world.distributed else "single"
        if info.get("layout", "single") != layout:
            how = "torchrun" if info.get("layout") == "sharded" else "one process"
            raise CheckpointError(
                f"{ckpt.path} was written by {info.get('processes', 1)} process(es) and this run has "
                f"{self.world.size}: resume with {how}"
            )
        optim = _unflatten_optimizer(
            ckpt.tensors("optimizer.safetensors"), info["optimizer_scalars"], info["param_groups"], layout
        )
        if layout == "sharded":
            _set_sharded(trainer, ckpt, optim)
        elif info.get("trainable_only"):
            _load_trainable(trainer.model, ckpt.tensors("model.safetensors"), ckpt.path)
        else:
            load_model(trainer.model, str(ckpt.path / "model.safetensors"), strict=True)
        extra = ckpt.tensors("extra.safetensors")
        cuda = [extra[k] for k in sorted((k for k in extra if k.startswith("rng.cuda.")), key=_index)]
        python_rng = _python_rng_from_json(info["python_rng"])
        rng = {"torch": extra["rng.torch"], "python": python_rng, "cuda": cuda}
        state = {"train_state": info["train_state"], "data_order": info["data_order"], "rng": rng}
        if layout == "single":
            state["optimizer"] = optim
        trainer.load_state_dict(state, model=False)
        trainer.last_metrics = info.get("last_metrics", {})
        return {k.removeprefix("extra."): v for k, v in extra.items() if k.startswith("extra.")}


def _gather(trainer: Any) -> tuple[Any, dict[str, Any], str]:
    """(weights, optimizer state, layout): the module and its indexed optimizer state for one process;
    full state dicts keyed by parameter name, gathered from every process, under FSDP2."""
    if not trainer.world.distributed:
        trainable_only = any(not p.requires_grad for p in trainer.model.parameters())
        weights = (
            {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
            if trainable_only
            else trainer.model
        )
        return weights, trainer.optimizer.state_dict(), "single"
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    frozen = any(not p.requires_grad for p in trainer.model.parameters())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=frozen)
    model_sd = get_model_state_dict(trainer.model, options=opts)
    optim_sd = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)
    return model_sd, optim_sd, "sharded"


def _set_sharded(trainer: Any, ckpt: Checkpoint, optim: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights = ckpt.tensors("model.safetensors")
    for alias, original in ckpt.info.get("aliases", {}).items():
        weights[alias] = weights[original]
    opts = StateDictOptions(full_state_dict=True, strict=not ckpt.info.get("trainable_only"))
    set_model_state_dict(trainer.model, weights, options=opts)
    set_optimizer_state_dict(
        trainer.model, trainer.optimizer, optim, options=StateDictOptions(full_state_dict=True)
    )


def _dedupe(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights (one tensor under two names) stored once; returns (weights, alias -> name)."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            out[name] = t.contiguous()
    return out, aliases


def _load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy the saved trainable weights (e.g. LoRA adapters) into ``model``, whose frozen base came
    from the starting model."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        extra, missing = sorted(tensors.keys() - params.keys()), sorted(params.keys() - tensors.keys())
        raise CheckpointError(
            f"{where}: its trainable weights do not fit this model (unexpected: {extra[:3]}, missing: "
            f"{missing[:3]}); resume with the same LoRA settings"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])


def _index(key: str) -> int:
    return int(key.rsplit(".", 1)[1])


def _problem(path: Path) -> str | None:
    """Why the checkpoint folder is not usable, or None."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({e})"
    for name in FILES:
        f = path / name
        want = entries.get(name) if isinstance(entries, dict) else None
        if not isinstance(want, dict):
            return f"manifest.json does not list {name}"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want.get('bytes')}"
        if _sha256(f) != want.get("sha256"):
            return f"{name} does not match its checksum (corrupt)"
    return None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as ``<param>::<name>`` tensors and scalars (param: index, or name under FSDP2)."""
    tensors, scalars = {}, {}
    for param, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}::{name}"] = value.detach().contiguous()
            else:
                scalars[f"{param}::{name}"] = value
    return tensors, scalars


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any], groups: list[dict[str, Any]], layout: str
) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *scalars.items()]:
        param, _, name = key.rpartition("::")
        state.setdefault(int(param) if layout == "single" else param, {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    return {"state": state, "param_groups": groups}


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _has(config: dict, dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs between two nested dicts. A key that ``a``
    (the checkpoint's config) lacks is a setting added since it was written, and is not a difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                continue
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix, a, b)]
