"""The preference stages: DPO and its variants, ORPO (no reference) and KTO (unpaired rows), one
sequence for all of them: prepare, the reference (precomputed, frozen, adapters off, or none), the
task, train, evaluate before and after, export."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from criteriapo.config import Config, DPOConfig
from criteriapo.criteria.pairs import RECIPES
from criteriapo.data.formats import DataKind
from criteriapo.distributed import (
    World,
    barrier,
    device_for,
    shard,
)
from criteriapo.errors import ConfigError
from criteriapo.eval.preference import preference_eval
from criteriapo.models import load_model, load_tokenizer
from criteriapo.models.loading import ModelSource
from criteriapo.models.lora import adapters_off, is_lora
from criteriapo.models.refcache import ReferenceCache, reference_cache, score_layout
from criteriapo.models.training import disable_dropout
from criteriapo.stages.common import (
    Plan,
    StageResult,
    Started,
    chat_tokenizer,
    fsdp_dtype,
    recipe_options,
    run_stage,
)
from criteriapo.stages.data import CRITERIA_BUILTINS, tokenized
from criteriapo.stages.methods import Reference, check_method, method_of
from criteriapo.tracking.progress import work_progress
from criteriapo.train.checkpoint import Checkpoint
from criteriapo.train.guard import guard_model
from criteriapo.train.precision import Precision
from criteriapo.train.scores import PairScores, score_pairs

log = logging.getLogger(__name__)


def check_choices(cfg: Config) -> Config:
    """The settings whose allowed values come from the registries (methods, losses), and those the
    method cannot use, checked as soon as a config is read: :meth:`Config.validate` checks the rest."""
    check_method(cfg.dpo)
    return cfg


def preflight_dpo(cfg: Config) -> None:
    """The DPO stage's data read, made into pairs and tokenized with the base model's tokenizer, so
    that a mistake there stops the pipeline before SFT has spent any time. The built-in criteria
    data is sampled from the SFT model later; nothing in it can be a user's mistake."""
    d = cfg.dpo
    if not d.data.train:
        raise ConfigError("dpo.data.train is empty: name at least one data file (or builtin:NAME)")
    _, _, chat = chat_tokenizer(cfg, cfg.model.name_or_path)
    for recipe in list(RECIPES) if d.recipe == "all" else [d.recipe]:
        ropts = recipe_options(d) if recipe else None
        for files in (d.data.train, d.data.eval):
            given = [f for f in files if f.removeprefix("builtin:") not in CRITERIA_BUILTINS]
            tokenized(d.data, given, method_of(d).data_kind, chat, None, recipe, ropts)


def references(
    cfg: Config,
    source: ModelSource,
    model,
    pad: int,
    train: list,
    evals: list,
    start_eval: PairScores | None,
    cache: dict | None,
    world: World,
    precision: Precision,
    packing: bool,
):
    """The reference the method's entry names (:class:`Reference`): scores of the train and eval
    pairs, or a model scoring each batch (the policy with its adapters off, or a frozen one sharded
    like the policy under FSDP2), or neither. Scored under the policy's precision, so that a reference
    equal to the starting weights gives log-ratios of exactly zero at step 1."""
    d, mbs = cfg.dpo, cfg.dpo.train.micro_batch_size
    reference = method_of(d).reference(d)
    if reference is Reference.NONE:
        return None, None, None
    if reference is Reference.ADAPTERS_OFF:
        assert is_lora(model), "dpo.lora.enabled, yet the policy has no adapters"
        return None, None, model  # the policy with its adapters off scores each batch: no copy
    if reference is Reference.FROZEN_MODEL:  # a frozen copy, or another model
        ref, ref_packing = _frozen_reference(cfg, source, train, pad, world, precision, packing)
        if not d.precompute_ref_log_probs:
            return None, None, ref
        return (
            score_pairs(ref, train, pad, mbs, packing=ref_packing, precision=precision, world=world),
            score_pairs(ref, evals, pad, mbs, packing=ref_packing, precision=precision, world=world)
            if evals
            else None,
            None,
        )
    # the starting weights are the reference: score them now, so no copy is ever held
    shown = cfg.tracking.progress and world.main
    with (
        adapters_off(model),
        (
            work_progress("reference: scoring the training pairs", len(train)) if shown else nullcontext()
        ) as advance,
    ):
        scores = score_pairs(model, train, pad, mbs, cache, packing, precision, advance, world)
        return scores, start_eval, None


def _frozen_reference(
    cfg: Config,
    source: ModelSource,
    train: list,
    pad: int,
    world: World,
    precision: Precision,
    packing: bool,
):
    """dpo.ref_model, or a copy of the starting weights, loaded frozen in the policy's precision
    (sharded like it under FSDP2), and whether it takes packed rows."""
    d = cfg.dpo
    ref = load_model(
        d.ref_model or source,
        dtype=precision.weights,
        device=device_for(world, cfg.model.device),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    ref.requires_grad_(False)
    if d.disable_dropout:
        disable_dropout(ref)
    ref_packing = guard_model(ref, train, "dpo", pad, packing)
    if packing and not ref_packing and not d.precompute_ref_log_probs:
        raise ConfigError(
            f"dpo.ref_model {d.ref_model} cannot take the packed rows the policy's batches use: set "
            "dpo.train.packing: false, or dpo.precompute_ref_log_probs: true (it is then scored padded)"
        )
    if packing and not ref_packing:
        log.warning("dpo.ref_model: scored with one padded row per sequence")
    return (shard(ref, fsdp_dtype(precision)) if world.distributed else ref), ref_packing


@dataclass
class References:
    """The starting model's scores and the reference of a preference stage. ``start_eval``: the
    starting model on the held-out sequences (the "before" figures, and usually the eval reference);
    ``train`` / ``eval``: precomputed reference scores, or ``model``: a reference scored per batch."""

    start_eval: PairScores | None
    train: PairScores | None
    eval: PairScores | None
    model: Any = None

    def state(self) -> dict[str, torch.Tensor]:
        """Saved with every checkpoint beside the tasks' own state (their reference scores, see
        ``DPOTask.state``), so a resumed run scores nothing again."""
        return self.start_eval.state("start_eval") if self.start_eval is not None else {}


def _score_references(
    cfg: Config, s: Started, train: list, evals: list, ref_cache: dict | None
) -> References:
    """On resume, from the checkpoint; else scored (each sequence once, through ``ref_cache``: by
    default a file in the cache folder, see :mod:`criteriapo.models.refcache`)."""
    d, prep, world = cfg.dpo, s.prep, s.world
    model, pad = prep.model, prep.tokenizer.pad_token_id
    if ref_cache is None and d.ref_cache and d.precompute_ref_log_probs:
        folders = [p for p in (prep.source.path, prep.source.base) if p]
        layout = score_layout(prep.packing, fsdp_dtype(prep.precision) if world.distributed else None)
        ref_cache = reference_cache(folders, model, prep.precision.autocast, layout)
    saved = saved_scores(s.latest)
    mbs, pack = d.train.micro_batch_size, prep.packing
    with adapters_off(model):
        start_eval = saved.get("start_eval") or (
            score_pairs(model, evals, pad, mbs, ref_cache, pack, prep.precision, world=world)
            if evals
            else None
        )
    if "train" in saved:
        refs = References(start_eval, saved["train"], saved.get("eval", start_eval))
    else:
        args = (
            cfg,
            prep.source,
            model,
            pad,
            train,
            evals,
            start_eval,
            ref_cache,
            world,
            prep.precision,
            pack,
        )
        refs = References(start_eval, *references(*args))
    if isinstance(ref_cache, ReferenceCache) and world.main:
        ref_cache.save()
    barrier(world)  # every process of a later stage reads the same cache (and so scores the same batches)
    return refs


def _check_ref_vocabulary(cfg: Config, model_spec: str, tokenizer) -> None:
    """A reference scores sequences tokenized for the policy: the vocabularies must be the same."""
    ref_model = cfg.dpo.ref_model
    if not ref_model:
        return
    if (
        load_tokenizer(ref_model, trust_remote_code=cfg.model.trust_remote_code).get_vocab()
        != tokenizer.get_vocab()
    ):
        raise ConfigError(
            f"dpo.ref_model {ref_model} has a different tokenizer from {model_spec}; "
            "a reference must share the policy's vocabulary"
        )


def _reference_and_plan(
    cfg: Config, model_spec: str, recipe: str | None, ref_cache: dict | None, s: Started
) -> Plan:
    """After :func:`begin`: a reference model's vocabulary checked, the reference scored, the plan."""
    _check_ref_vocabulary(cfg, model_spec, s.prep.tokenizer)
    t1 = time.perf_counter()
    method = method_of(cfg.dpo)
    # scored and cached as pairs; KTO's as its completions, then its KL completions
    train, evals = method.as_pairs(s.prep.train), method.as_pairs(s.prep.evals)
    refs = _score_references(cfg, s, train, evals, ref_cache)
    seconds = {"prepare": t1 - s.t0, "reference": time.perf_counter() - t1}
    return _plan(cfg, s, refs, recipe, seconds)


def _plan(cfg: Config, s: Started, refs: References, recipe: str | None, seconds: dict[str, float]) -> Plan:
    """The task (DPOTask, or KTOTask for unpaired rows) with its reference, and the before / after
    evaluation on held-out pairs: the starting model is its own reference (reward accuracy 0); after,
    the trainer's final evaluation scored every held-out pair with the trained weights."""
    d, prep = cfg.dpo, s.prep
    pad, vocab = prep.tokenizer.pad_token_id, prep.model.get_output_embeddings().weight.shape[0]
    method = method_of(d)
    cls = method.task
    task = cls(d, pad, vocab, reference=refs.train, ref_model=refs.model, packing=prep.packing)
    evals = prep.evals
    eval_task = (
        cls(d, pad, vocab, reference=refs.eval, ref_model=refs.model, packing=prep.packing) if evals else None
    )
    ref_kind = method.reference(d)
    reference = refs.eval if refs.eval is not None else (None if d.ref_model else refs.start_eval)
    reference = None if ref_kind is Reference.NONE else reference

    def results(metrics: dict[str, float], scores: PairScores | None) -> dict[str, Any]:
        if not evals or method.data_kind != DataKind.PREFERENCE:  # KTO's: its loss and metrics (eval/...)
            return {}
        before = preference_eval(refs.start_eval, evals, reference, d.beta)
        after = preference_eval(scores, evals, reference, d.beta)
        metrics.update({"eval/preference_accuracy": after.accuracy, "eval/logp_margin": after.margin})
        return {"before": before.as_dict(), "after": after.as_dict()}

    return Plan(
        task,
        prep.train,
        evals,
        label=f"{method.name} ({d.loss_type})",
        method=method.describe(d, recipe),
        eval_task=eval_task,
        notes=[f"Reference model: {reference_note(d, ref_kind)}"],
        extra_state=refs.state(),
        results=results,
        seconds=seconds,
    )


def run_dpo(
    cfg: Config,
    model_spec: str | None = None,
    run_dir: Path | None = None,
    recipe: str | None = None,
    ref_cache: dict | None = None,
    resume: bool = False,
) -> StageResult:
    """The preference stage from ``model_spec``: DPO or a variant, ORPO, or KTO (``dpo.loss_type``).
    With a recipe, pairs are built from multi-criteria data. The starting model's score of each
    sequence is kept in ``ref_cache``, so recipes, reruns and later epochs score nothing twice."""
    model_spec = model_spec or cfg.model.name_or_path
    d = check_choices(cfg).dpo
    recipe = recipe or (d.recipe if d.recipe != "all" else None)
    if d.recipe == "all" and recipe is None:
        raise ConfigError(
            "dpo.recipe: all trains one model per recipe: use `criteriapo pipeline`, or pick one"
        )
    method = method_of(d)
    run_dir = Path(run_dir or Path(cfg.output_dir) / method.folder(recipe))
    plan = partial(_reference_and_plan, cfg, model_spec, recipe, ref_cache)
    return run_stage(cfg, method, model_spec, run_dir, plan, recipe, resume)


def saved_scores(ckpt: Checkpoint | None) -> dict[str, PairScores]:
    """The scores a checkpoint keeps: ``start_eval`` (the stage's), ``train`` and ``eval`` (the
    training and evaluation tasks' precomputed references)."""
    if ckpt is None:
        return {}
    tensors = ckpt.tensors("extra.safetensors")
    names = {
        "start_eval": "extra.start_eval",
        "train": "extra.task.reference",
        "eval": "extra.eval_task.reference",
    }
    return {k: sc for k, name in names.items() if (sc := PairScores.from_state(tensors, name)) is not None}


def reference_note(d: DPOConfig, reference: Reference) -> str:
    """The model card's line on the reference (``reference``: the method's, from ``d``)."""
    if reference is Reference.NONE:
        return "none (reference-free)"
    where = d.ref_model or "the starting weights" + (" (LoRA adapters off)" if d.lora.enabled else "")
    return f"{where}, log-probs precomputed" if d.precompute_ref_log_probs else f"{where}, kept frozen"
