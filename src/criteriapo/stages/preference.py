"""The preference stages: DPO and its variants, ORPO (no reference) and KTO (unpaired rows), one
sequence for all of them: prepare, the reference (precomputed, frozen, adapters off, or none), the
task, train, evaluate before and after, export."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

from criteriapo.config import Config, DPOConfig, to_dict
from criteriapo.criteria.pairs import RECIPES
from criteriapo.distributed import (
    World,
    barrier,
    device_for,
    init_world,
    shard,
)
from criteriapo.errors import ConfigError
from criteriapo.eval.preference import PreferenceEval, preference_eval
from criteriapo.export import ModelCard
from criteriapo.losses.dpo import LOSSES, loss_spec
from criteriapo.models import load_model, load_tokenizer
from criteriapo.models.loading import ModelSource
from criteriapo.models.lora import adapters_off, is_lora
from criteriapo.models.refcache import ReferenceCache, reference_cache, score_layout
from criteriapo.models.training import disable_dropout
from criteriapo.resume import record_finished, stage_checkpointer
from criteriapo.stages.common import (
    StageResult,
    chat_tokenizer,
    finish,
    fsdp_dtype,
    prepare,
    progress_bar,
    recipe_options,
    stage_loggers,
)
from criteriapo.stages.data import CRITERIA_BUILTINS, tokenized
from criteriapo.tracking.progress import work_progress
from criteriapo.train.checkpoint import Checkpoint
from criteriapo.train.guard import guard_model
from criteriapo.train.loop import Trainer
from criteriapo.train.precision import Precision
from criteriapo.train.tasks import DPOTask, KTOTask, PairScores, score_pairs

log = logging.getLogger(__name__)


def check_choices(cfg: Config) -> Config:
    """The settings whose allowed values come from the registries (losses, recipes), checked as soon
    as a config is read: :meth:`Config.validate` checks the rest, below them."""
    d = cfg.dpo
    if d.loss_type == "kto":  # unpaired: its own task, no pair loss
        if d.reference_free:
            raise ConfigError(
                "dpo.reference_free: KTO's rewards are log-ratios against a reference; set it false"
            )
        if d.recipe:
            raise ConfigError(
                "dpo.recipe builds pairs from multi-criteria data; KTO reads unpaired rows or pairs"
            )
        return cfg
    if d.loss_type not in LOSSES:
        choices = ", ".join([*LOSSES, "kto"])
        raise ConfigError(f"dpo.loss_type: unknown loss {d.loss_type!r}; choose one of {choices}")
    spec = loss_spec(cfg.dpo.loss_type)
    if spec.chosen_nll and cfg.dpo.rpo_alpha:
        raise ConfigError(
            f"dpo.rpo_alpha: {cfg.dpo.loss_type} has the chosen replies' NLL in its loss already (weight "
            f"{spec.chosen_nll}); leave rpo_alpha unset"
        )
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
            tokenized(d.data, given, "preference", chat, None, recipe, ropts)


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
    """Reference scores of the train and eval pairs, or a frozen reference model (sharded like the
    policy under FSDP2), or neither. Scored under the policy's precision, so that a reference equal
    to the starting weights gives log-ratios of exactly zero at step 1."""
    d, mbs = cfg.dpo, cfg.dpo.train.micro_batch_size
    if d.reference_free or (d.loss_type != "kto" and loss_spec(d.loss_type).reference_free):
        return None, None, None
    if not d.precompute_ref_log_probs and is_lora(model) and not d.ref_model:
        return None, None, model  # the policy with its adapters off scores each batch: no copy
    if not d.precompute_ref_log_probs or d.ref_model:  # a frozen copy, or another model
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
        ref = shard(ref, fsdp_dtype(precision)) if world.distributed else ref
        if not d.precompute_ref_log_probs:
            return None, None, ref
        return (
            score_pairs(ref, train, pad, mbs, packing=ref_packing, precision=precision),
            score_pairs(ref, evals, pad, mbs, packing=ref_packing, precision=precision) if evals else None,
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
        return score_pairs(model, train, pad, mbs, cache, packing, precision, advance), start_eval, None


def run_dpo(
    cfg: Config,
    model_spec: str | None = None,
    run_dir: Path | None = None,
    recipe: str | None = None,
    ref_cache: dict | None = None,
    resume: bool = False,
) -> StageResult:
    """DPO from ``model_spec``. With a recipe, pairs are built from multi-criteria data. The starting
    model's score of each sequence is kept in ``ref_cache`` (by default a file in the cache folder,
    see :mod:`criteriapo.models.refcache`), so recipes, reruns and later epochs score nothing twice."""
    model_spec = model_spec or cfg.model.name_or_path
    d = cfg.dpo
    recipe = recipe or (d.recipe if d.recipe != "all" else None)
    if d.recipe == "all" and recipe is None:
        raise ConfigError(
            "dpo.recipe: all trains one model per recipe: use `criteriapo pipeline`, or pick one"
        )
    run_dir = Path(run_dir or Path(cfg.output_dir) / d.folder(recipe))
    t0 = time.perf_counter()
    world = init_world()
    prep = prepare(cfg, model_spec, d, "dpo", run_dir, recipe, resume, world)
    source, tokenizer, model, train, evals = prep.source, prep.tokenizer, prep.model, prep.train, prep.evals
    ck, latest, done = stage_checkpointer(
        cfg, "dpo", d, model_spec, run_dir, train, world, resume, recipe=recipe
    )
    if done is not None:
        before, after = (PreferenceEval(**done[k]) if done.get(k) else None for k in ("before", "after"))
        seconds = {"prepare": time.perf_counter() - t0}
        return StageResult(run_dir, run_dir / "model", done["metrics"], seconds, before, after)
    if d.ref_model:  # it scores sequences tokenized for the policy: the vocabularies must be the same
        ref_tok = load_tokenizer(d.ref_model, trust_remote_code=cfg.model.trust_remote_code)
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"dpo.ref_model {d.ref_model} has a different tokenizer from {model_spec}; "
                "a reference must share the policy's vocabulary"
            )
    pad = tokenizer.pad_token_id
    unpaired = d.loss_type == "kto"
    if unpaired:  # scored and cached as pairs: the completion, then the KL completion
        train_examples, train, evals = train, [e.as_pair() for e in train], [e.as_pair() for e in evals]
    t1 = time.perf_counter()
    if ref_cache is None and d.ref_cache and d.precompute_ref_log_probs:
        folders = [p for p in (source.path, source.base) if p]
        layout = score_layout(prep.packing, fsdp_dtype(prep.precision) if world.distributed else None)
        ref_cache = reference_cache(folders, model, prep.precision.autocast, layout)
    saved = saved_scores(latest)  # on resume: the starting model's scores, from the checkpoint
    # the starting model's scores on held-out pairs: "before" accuracy, and the eval reference
    mbs, pack = d.train.micro_batch_size, prep.packing
    with adapters_off(model):
        start_eval = saved.get("start_eval") or (
            score_pairs(model, evals, pad, mbs, ref_cache, pack, prep.precision) if evals else None
        )
    if "ref_train" in saved:
        ref_train, ref_eval, ref_model = saved["ref_train"], saved.get("ref_eval", start_eval), None
    else:
        ref_train, ref_eval, ref_model = references(
            cfg, source, model, pad, train, evals, start_eval, ref_cache, world, prep.precision, pack
        )
    if isinstance(ref_cache, ReferenceCache) and world.main:
        ref_cache.save()
    barrier(world)  # every process of a later stage reads the same cache (and so scores the same batches)
    # saved with checkpoints; the eval reference is usually the start scores themselves
    scores = {"start_eval": start_eval, "ref_train": ref_train}
    if ref_eval is not start_eval:
        scores["ref_eval"] = ref_eval
    t2 = time.perf_counter()
    vocab = model.get_output_embeddings().weight.shape[0]
    task_class = KTOTask if unpaired else DPOTask
    task = task_class(d, pad, vocab, reference=ref_train, ref_model=ref_model, packing=pack)
    eval_task = (
        task_class(d, pad, vocab, reference=ref_eval, ref_model=ref_model, packing=pack) if evals else None
    )
    if unpaired:
        train, evals = train_examples, prep.evals
    loggers = stage_loggers(cfg, run_dir, "dpo", world)
    trainer = Trainer(
        model,
        task,
        train,
        d.optim,
        d.train,
        loggers,
        evals,
        progress_bar(cfg, f"dpo ({d.loss_type})", world),
        eval_task=eval_task,
        checkpointer=ck,
        world=world,
        precision=prep.precision,
        extra_state={
            f"{name}.{k}": v for name, sc in scores.items() if sc is not None for k, v in vars(sc).items()
        },
    )
    if latest is not None:
        ck.restore(trainer, latest)
    metrics = trainer.train()
    t3 = time.perf_counter()
    # before: the starting model is its own reference (reward accuracy 0); after: the trainer's final
    # evaluation scored every held-out pair with the trained weights, against the eval reference
    reference = ref_eval if ref_eval is not None else (None if d.ref_model else start_eval)
    reference = None if task.reference_free else reference
    paired = evals and not unpaired  # KTO's evaluation is its loss and metrics (eval/ in metrics.jsonl)
    before = preference_eval(start_eval, evals, reference, d.beta) if paired else None
    after = preference_eval(eval_task.scored(len(evals)), evals, reference, d.beta) if paired else None
    if after is not None:
        metrics.update({"eval/preference_accuracy": after.accuracy, "eval/logp_margin": after.margin})
    card = ModelCard(
        name=f"{Path(cfg.output_dir).name}-dpo",
        base_model=source.spec,
        method=method_name(d, recipe),
        datasets=d.data.train,
        hyperparameters=to_dict(d),
        metrics=metrics,
        notes=[f"Reference model: {reference_note(d, task)}"],
    )
    model_dir = finish(cfg, d, trainer, run_dir, tokenizer, card, source)
    results = {"metrics": metrics, **{k: e.as_dict() for k, e in (("before", before), ("after", after)) if e}}
    record_finished(run_dir, ck, results, d.train.keep_final_checkpoint, world)
    seconds = {"prepare": t1 - t0, "reference": t2 - t1, "train": t3 - t2, "export": time.perf_counter() - t3}
    return StageResult(run_dir, model_dir, metrics, seconds, before, after)


def method_name(d: DPOConfig, recipe: str | None) -> str:
    if d.loss_type == "kto":
        weights = f"desirable_weight {d.desirable_weight}, undesirable_weight {d.undesirable_weight}"
        return f"KTO (beta {d.beta}, {weights})"
    if d.loss_type == "orpo":
        return f"ORPO (beta {d.beta}, no reference)"
    return f"DPO (loss_type {d.loss_type}, beta {d.beta}" + (f", recipe {recipe})" if recipe else ")")


def saved_scores(ckpt: Checkpoint | None) -> dict[str, PairScores]:
    if ckpt is None:
        return {}
    tensors = ckpt.tensors("extra.safetensors")
    out = {}
    for name in ("start_eval", "ref_train", "ref_eval"):
        if f"extra.{name}.chosen" in tensors:
            out[name] = PairScores(**{f.name: tensors[f"extra.{name}.{f.name}"] for f in fields(PairScores)})
    return out


def reference_note(d: DPOConfig, task: DPOTask) -> str:
    if task.reference_free:
        return "none (reference-free)"
    where = d.ref_model or "the starting weights" + (" (LoRA adapters off)" if d.lora.enabled else "")
    return f"{where}, log-probs precomputed" if d.precompute_ref_log_probs else f"{where}, kept frozen"
