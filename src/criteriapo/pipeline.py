"""Stages: SFT, DPO, and the pipeline (SFT, then DPO against the SFT model, evaluation, export).

Each stage checks everything (config, model folder, data) before any long work, trains with the
one loop, and ends in a run folder holding ``metrics.jsonl``, plots, ``bad_rows.jsonl`` when rows
were skipped, ``config.yaml``, ``checkpoints/`` (see :mod:`criteriapo.train.checkpoint`) and
``model/``: a standard Hugging Face model folder. With ``resume``, a stage goes on from its latest
valid checkpoint, after checking that its config and data are those the checkpoint was made with.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from criteriapo.config import Config, CriteriaDataConfig, DataConfig, DPOConfig, SFTConfig, to_dict
from criteriapo.criteria.pairs import RECIPES, RecipeOptions, build_pairs
from criteriapo.data.builtin import builtin_path
from criteriapo.data.loading import load_data
from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions, assign_kl, tokenize_examples
from criteriapo.distributed import (
    World,
    all_sum,
    barrier,
    check_batch,
    device_for,
    gather_model,
    init_world,
    shard,
)
from criteriapo.errors import ConfigError
from criteriapo.eval.preference import PreferenceEval, preference_eval
from criteriapo.export import ExportError, ModelCard, export_model
from criteriapo.generation import chat_messages, generate_batch
from criteriapo.losses.dpo import LOSSES, loss_spec
from criteriapo.models import load_model, load_tokenizer, resolve_model
from criteriapo.models.loading import ModelSource, pick_device, pick_dtype
from criteriapo.models.lora import adapters_off, apply_lora, for_export, is_lora, trainable_parameters
from criteriapo.models.refcache import ReferenceCache, reference_cache, score_layout
from criteriapo.models.training import disable_dropout, enable_activation_checkpointing
from criteriapo.resume import FINISHED, guard_unfinished, record_finished, stage_checkpointer
from criteriapo.tracking.loggers import Loggers, build_loggers
from criteriapo.tracking.plots import plot_run
from criteriapo.tracking.progress import ProgressBar, work_progress
from criteriapo.train.checkpoint import Checkpoint
from criteriapo.train.guard import guard_model
from criteriapo.train.loop import Trainer, seed_everything
from criteriapo.train.precision import Precision, check_updates_survive, resolve_precision
from criteriapo.train.tasks import DPOTask, KTOTask, PairScores, SFTTask, score_pairs

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    run_dir: Path
    model_dir: Path
    metrics: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    before: PreferenceEval | None = None  # DPO only: held-out preference of the starting model
    after: PreferenceEval | None = None


CRITERIA_BUILTINS = ("criteria-train", "criteria-heldout")


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


def data_paths(
    entries: list[str], model: str | None = None, maker: CriteriaDataConfig | None = None
) -> list[Path]:
    """Paths as given; ``builtin:NAME`` names a dataset the project makes itself: ``sft``,
    ``preference-train``, ``preference-eval``, or ``criteria-train`` / ``criteria-heldout``: replies
    sampled from ``model`` (the model DPO starts from, so the data is on-policy) with the settings
    ``maker`` (``dpo.criteria_data``), made once per model and settings into the cache."""
    out = []
    for e in entries:
        name = e.removeprefix("builtin:")
        if name == e:
            out.append(Path(e))
        elif name in CRITERIA_BUILTINS:
            if model is None:
                raise ConfigError(f"{e} is sampled from the model DPO starts from; name it in dpo.data only")
            out.append(
                _builtin_criteria(model, maker or CriteriaDataConfig())
                / f"{name.removeprefix('criteria-')}.jsonl"
            )
        else:
            try:
                out.append(builtin_path(name))
            except ValueError as err:
                raise ConfigError(f"{err}, {', '.join(CRITERIA_BUILTINS)}") from None
    return out


def _builtin_criteria(model: str, maker: CriteriaDataConfig) -> Path:
    from criteriapo.criteria.maker import MakerOptions, make_criteria_dataset, maker_digest
    from criteriapo.fsutil import cache_dir, file_lock
    from criteriapo.models.refcache import folder_digest

    source = resolve_model(model)
    opts = MakerOptions(**to_dict(maker))
    # a changed maker or another model (by the digest of its files), a new folder
    folder = cache_dir() / "data" / f"criteria-{maker_digest(opts)}-{folder_digest(source.path)[:12]}"
    with file_lock(folder.with_suffix(".lock")):
        if not (folder / "heldout.jsonl").exists():
            log.warning(
                "making the criteria data: %d replies per prompt from %s (minutes, unless sampled before)",
                opts.samples,
                source.spec,
            )
            make_criteria_dataset(folder, str(source.path), opts)
    return folder


def _tokenized(
    data: DataConfig,
    files: list[str],
    kind: str,
    tok: ChatTokenizer,
    run_dir: Path | None,
    recipe: str | None = None,
    recipe_opts: RecipeOptions | None = None,
    model: str | None = None,
    maker: CriteriaDataConfig | None = None,
) -> list:
    """Load, validate and tokenize; with a recipe, the files are multi-criteria data made into pairs.
    ``model`` and ``maker`` make the built-in criteria data (see :func:`data_paths`)."""
    if not files:
        return []
    report = run_dir / "bad_rows.jsonl" if run_dir is not None else None
    loaded = load_data(
        data_paths(files, model, maker),
        kind="multi_criteria" if recipe else kind,
        split=data.split,
        on_bad_row=data.on_bad_row,
        report_path=report,
        max_row_bytes=data.max_row_bytes,
    )
    examples = (
        build_pairs(recipe, loaded.examples, recipe_opts or RecipeOptions()) if recipe else loaded.examples
    )
    if not examples:
        raise ConfigError(f"the {recipe} recipe built no pairs from {', '.join(files)}")
    opts = TokenizeOptions(data.max_length, data.max_prompt_length, data.truncation_mode)
    return tokenize_examples(examples, tok, opts, on_bad_row=data.on_bad_row, report_path=report)


@dataclass
class Prepared:
    source: ModelSource
    tokenizer: Any
    model: Any
    train: list
    evals: list
    precision: Precision
    packing: bool


def _prepare(
    cfg: Config,
    model_spec: str,
    stage: SFTConfig | DPOConfig,
    kind: str,
    run_dir: Path,
    recipe: str | None = None,
    resume: bool = False,
    world: World | None = None,
) -> Prepared:
    """Every check that can fail fast, in order: checkpoints, model folder, data, then the weights,
    then the guard (our log-probs and packing against the model's own forward)."""
    world = world or init_world()
    check_batch(world, stage.train.batch_size, stage.train.micro_batch_size, kind)
    guard_unfinished(run_dir / "checkpoints", resume, world)
    source, tokenizer, chat = _chat_tokenizer(cfg, model_spec)
    if not stage.data.train:
        raise ConfigError(f"{kind}.data.train is empty: name at least one data file (or builtin:NAME)")
    run_dir.mkdir(parents=True, exist_ok=True)
    # a rerun into the same folder starts clean; a resumed one keeps its metrics (trimmed later)
    for stale in (
        (("bad_rows.jsonl",) if resume else ("bad_rows.jsonl", "metrics.jsonl", FINISHED))
        if world.main
        else ()
    ):
        (run_dir / stale).unlink(missing_ok=True)
    barrier(world)
    unpaired = kind == "dpo" and stage.loss_type == "kto"
    data_kind = "sft" if kind == "sft" else "unpaired" if unpaired else "preference"
    ropts = _recipe_options(stage) if recipe else None
    report = run_dir if world.main else None  # one report, from rank 0
    made = (model_spec, stage.criteria_data) if kind == "dpo" else (None, None)
    train = _tokenized(stage.data, stage.data.train, data_kind, chat, report, recipe, ropts, *made)
    evals = _tokenized(stage.data, stage.data.eval, data_kind, chat, report, recipe, ropts, *made)
    if unpaired:  # each example's mismatched completion for the KL estimate, fixed by the seed
        opts = TokenizeOptions(
            stage.data.max_length, stage.data.max_prompt_length, stage.data.truncation_mode
        )
        for i, examples in enumerate((train, evals)):
            assign_kl(examples, stage.train.seed + i, opts)
    seed_everything(stage.train.seed)
    device = device_for(world, cfg.model.device)
    precision = resolve_precision(
        stage.train.precision, pick_dtype(cfg.model.dtype, pick_device(device)), stage.lora.enabled
    )
    model = load_model(
        source, dtype=precision.weights, device=device, trust_remote_code=cfg.model.trust_remote_code
    )
    if stage.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if stage.lora.enabled:
        model = apply_lora(model, stage.lora)
        trainable, total = trainable_parameters(model)
        log.info("LoRA: %d of %d parameters train (%.2f%%)", trainable, total, 100 * trainable / total)
    if kind == "dpo" and stage.disable_dropout:  # after LoRA: its adapters have dropout of their own
        disable_dropout(model)
    if precision.name == "bf16-true":
        check_updates_survive(model, stage.optim, kind)
    probe = [e.as_pair() for e in train[:8]] if unpaired else train
    packing = guard_model(model, probe, kind, tokenizer.pad_token_id, stage.train.packing)
    if world.distributed:
        model = shard(model, _fsdp_dtype(precision))
    return Prepared(source, tokenizer, model, train, evals, precision, packing)


def _fsdp_dtype(precision: Precision):
    """FSDP2 gathers bf16-mixed weights in bf16 (half the traffic); every model of a run is sharded
    alike, so a frozen reference computes as the policy does."""
    return precision.autocast if precision.name == "bf16-mixed" else None


def _chat_tokenizer(cfg: Config, model_spec: str):
    source = resolve_model(model_spec, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.chat_template:
        path = Path(cfg.model.chat_template)
        if not path.is_file():
            raise ConfigError(f"model.chat_template: no such file {path}")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    chat = ChatTokenizer(tokenizer, _eos_ids(source), name=model_spec)
    return source, tokenizer, chat


def _preflight_dpo(cfg: Config) -> None:
    """The DPO stage's data read, made into pairs and tokenized with the base model's tokenizer, so
    that a mistake there stops the pipeline before SFT has spent any time. The built-in criteria
    data is sampled from the SFT model later; nothing in it can be a user's mistake."""
    d = cfg.dpo
    if not d.data.train:
        raise ConfigError("dpo.data.train is empty: name at least one data file (or builtin:NAME)")
    _, _, chat = _chat_tokenizer(cfg, cfg.model.name_or_path)
    for recipe in list(RECIPES) if d.recipe == "all" else [d.recipe]:
        ropts = _recipe_options(d) if recipe else None
        for files in (d.data.train, d.data.eval):
            given = [f for f in files if f.removeprefix("builtin:") not in CRITERIA_BUILTINS]
            _tokenized(d.data, given, "preference", chat, None, recipe, ropts)


def _recipe_options(d: DPOConfig) -> RecipeOptions:
    return RecipeOptions(d.mini_size, d.mini_min_margin, d.criterion_weights, d.condition_on_criterion)


def _eos_ids(source: ModelSource) -> list[int]:
    path = source.path / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def _write_config(run_dir: Path, cfg: Config) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def _finish(
    cfg: Config,
    stage: SFTConfig | DPOConfig,
    trainer: Trainer,
    run_dir: Path,
    tokenizer,
    card: ModelCard,
    source: ModelSource,
) -> Path:
    trainer.loggers.close()
    world = trainer.world
    if cfg.tracking.plots and world.main:
        plot_run(run_dir)
    model = trainer.model
    dtype = pick_dtype(cfg.model.dtype, str(next(model.parameters()).device))  # what the user asked for
    if world.distributed:  # every process hands over its shard; rank 0 rebuilds the whole model
        model = gather_model(model, source, stage.lora, dtype, world)
    elif not stage.lora.enabled:  # float32 master weights are saved in that dtype
        model.to(dtype)
    out = run_dir / "model"
    failure = None
    if world.main:
        try:
            export_model(for_export(model, keep_adapter=stage.lora.export == "adapter"), tokenizer, out, card)
        except ExportError as e:
            failure = e
    if all_sum([float(failure is not None)], world)[0]:  # every process stops together
        e = failure or ExportError(f"rank 0 could not write the model folder {out}")
        if trainer.last_checkpoint is None:
            raise e
        raise ExportError(
            f"{e}. The trained weights are safe in {trainer.last_checkpoint}: fix the cause and run the "
            "same command with --resume to export them without training again"
        ) from e
    return out


def _progress(cfg: Config, label: str, world: World) -> ProgressBar | None:
    return ProgressBar(label) if cfg.tracking.progress and world.main else None


def _loggers(cfg: Config, run_dir: Path, name: str, world: World) -> Loggers:
    if not world.main:
        return Loggers([])
    _write_config(run_dir, cfg)
    return build_loggers(run_dir, cfg.tracking, f"{Path(cfg.output_dir).name}-{name}", to_dict(cfg))


def run_sft(
    cfg: Config, model_spec: str | None = None, run_dir: Path | None = None, resume: bool = False
) -> StageResult:
    model_spec = model_spec or cfg.model.name_or_path
    run_dir = Path(run_dir or Path(cfg.output_dir) / "sft")
    t0 = time.perf_counter()
    world = init_world()
    prep = _prepare(cfg, model_spec, cfg.sft, "sft", run_dir, resume=resume, world=world)
    source, tokenizer, train = prep.source, prep.tokenizer, prep.train
    ck, latest, done = stage_checkpointer(cfg, "sft", cfg.sft, model_spec, run_dir, train, world, resume)
    if done is not None:
        return StageResult(run_dir, run_dir / "model", done["metrics"], {"prepare": time.perf_counter() - t0})
    loggers = _loggers(cfg, run_dir, "sft", world)
    trainer = Trainer(
        prep.model,
        SFTTask(tokenizer.pad_token_id, prep.packing),
        train,
        cfg.sft.optim,
        cfg.sft.train,
        loggers,
        prep.evals,
        _progress(cfg, "sft", world),
        checkpointer=ck,
        world=world,
        precision=prep.precision,
    )
    if latest is not None:
        ck.restore(trainer, latest)
    t1 = time.perf_counter()
    metrics = trainer.train()
    t2 = time.perf_counter()
    card = ModelCard(
        name=f"{Path(cfg.output_dir).name}-sft",
        base_model=source.spec,
        method="SFT",
        datasets=cfg.sft.data.train,
        hyperparameters=to_dict(cfg.sft),
        metrics=metrics,
    )
    model_dir = _finish(cfg, cfg.sft, trainer, run_dir, tokenizer, card, source)
    record_finished(run_dir, ck, {"metrics": metrics}, cfg.sft.train.keep_final_checkpoint, world)
    seconds = {"prepare": t1 - t0, "train": t2 - t1, "export": time.perf_counter() - t2}
    return StageResult(run_dir, model_dir, metrics, seconds)


def _references(
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
        ref = shard(ref, _fsdp_dtype(precision)) if world.distributed else ref
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
    prep = _prepare(cfg, model_spec, d, "dpo", run_dir, recipe, resume, world)
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
        layout = score_layout(prep.packing, _fsdp_dtype(prep.precision) if world.distributed else None)
        ref_cache = reference_cache(folders, model, prep.precision.autocast, layout)
    saved = _saved_scores(latest)  # on resume: the starting model's scores, from the checkpoint
    # the starting model's scores on held-out pairs: "before" accuracy, and the eval reference
    mbs, pack = d.train.micro_batch_size, prep.packing
    with adapters_off(model):
        start_eval = saved.get("start_eval") or (
            score_pairs(model, evals, pad, mbs, ref_cache, pack, prep.precision) if evals else None
        )
    if "ref_train" in saved:
        ref_train, ref_eval, ref_model = saved["ref_train"], saved.get("ref_eval", start_eval), None
    else:
        ref_train, ref_eval, ref_model = _references(
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
    loggers = _loggers(cfg, run_dir, "dpo", world)
    trainer = Trainer(
        model,
        task,
        train,
        d.optim,
        d.train,
        loggers,
        evals,
        _progress(cfg, f"dpo ({d.loss_type})", world),
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
        method=_method_name(d, recipe),
        datasets=d.data.train,
        hyperparameters=to_dict(d),
        metrics=metrics,
        notes=[f"Reference model: {_reference_note(d, task)}"],
    )
    model_dir = _finish(cfg, d, trainer, run_dir, tokenizer, card, source)
    results = {"metrics": metrics, **{k: e.as_dict() for k, e in (("before", before), ("after", after)) if e}}
    record_finished(run_dir, ck, results, d.train.keep_final_checkpoint, world)
    seconds = {"prepare": t1 - t0, "reference": t2 - t1, "train": t3 - t2, "export": time.perf_counter() - t3}
    return StageResult(run_dir, model_dir, metrics, seconds, before, after)


def _method_name(d: DPOConfig, recipe: str | None) -> str:
    if d.loss_type == "kto":
        weights = f"desirable_weight {d.desirable_weight}, undesirable_weight {d.undesirable_weight}"
        return f"KTO (beta {d.beta}, {weights})"
    if d.loss_type == "orpo":
        return f"ORPO (beta {d.beta}, no reference)"
    return f"DPO (loss_type {d.loss_type}, beta {d.beta}" + (f", recipe {recipe})" if recipe else ")")


def _saved_scores(ckpt: Checkpoint | None) -> dict[str, PairScores]:
    if ckpt is None:
        return {}
    tensors = ckpt.tensors("extra.safetensors")
    out = {}
    for name in ("start_eval", "ref_train", "ref_eval"):
        if f"extra.{name}.chosen" in tensors:
            out[name] = PairScores(**{f.name: tensors[f"extra.{name}.{f.name}"] for f in fields(PairScores)})
    return out


def _reference_note(d: DPOConfig, task: DPOTask) -> str:
    if task.reference_free:
        return "none (reference-free)"
    where = d.ref_model or "the starting weights" + (" (LoRA adapters off)" if d.lora.enabled else "")
    return f"{where}, log-probs precomputed" if d.precompute_ref_log_probs else f"{where}, kept frozen"


@dataclass
class PipelineResult:
    sft: StageResult | None  # None when the preference stage trains from the base model (ORPO)
    dpo: dict[str, StageResult]  # one per recipe ("dpo" or "orpo" when the data are plain pairs)
    generations: list[dict[str, str]]
    seconds: dict[str, float]
    summary_path: Path
    comparison: Path | None = None


def sample_replies(cfg: Config, model_dir: Path, prompts: list[str]) -> list[str]:
    """Greedy replies to ``prompts``, in one batch."""
    model = load_model(model_dir, dtype=cfg.model.dtype, device=cfg.model.device)
    tok, max_new_tokens = load_tokenizer(model_dir), cfg.eval.max_new_tokens
    conversations = [chat_messages(p) for p in prompts]
    replies = generate_batch(model, tok, conversations, max_new_tokens=max_new_tokens, temperature=0.0)
    return [r.text for r in replies]


def _compare(cfg: Config, out: Path, start_name: str, start: Path, dpo: dict[str, StageResult]) -> Path:
    """Held-out criteria comparison of the starting model and each tuned one (and the base model
    with eval.compare_base), reward accuracy against the starting model."""
    from criteriapo.eval.criteria import compare

    files = data_paths(cfg.dpo.data.eval, str(start), cfg.dpo.criteria_data)
    held = load_data(files, kind="multi_criteria", on_bad_row="skip").examples
    base = [("base", cfg.model.name_or_path)] if cfg.eval.compare_base and start_name != "base" else []
    models = [*base, (start_name, str(start)), *((name, str(stage.model_dir)) for name, stage in dpo.items())]
    compare(
        models,
        held,
        out / "comparison",
        max_new_tokens=cfg.eval.max_new_tokens,
        reference=str(start),
        beta=cfg.dpo.beta,
    )
    return out / "comparison" / "comparison.md"


def run_pipeline(cfg: Config, resume: bool = False) -> PipelineResult:
    """SFT, then DPO against the SFT model (one run per recipe with ``dpo.recipe: all``, sharing one
    reference pass), generations before and after, and with criteria data a comparison by criterion."""
    out = Path(cfg.output_dir)
    world = init_world()
    t0 = time.perf_counter()
    if world.main:  # fetch and check first; rank 0 alone downloads nothing and makes the built-in data
        resolve_model(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    t_fetch = time.perf_counter()
    if world.main:
        data_paths(cfg.sft.data.train)
    barrier(world)
    _preflight_dpo(cfg)
    t_data = time.perf_counter()
    # ORPO starts from the base model in one stage; DPO from the SFT model
    sft = None if cfg.dpo.one_stage else run_sft(cfg, run_dir=out / "sft", resume=resume)
    start = sft.model_dir if sft else resolve_model(cfg.model.name_or_path).path
    recipes = list(RECIPES) if cfg.dpo.recipe == "all" else [cfg.dpo.recipe]
    # the SFT model's log-prob of each sequence is scored once for every recipe (the on-disk cache,
    # or with dpo.ref_cache false one dict shared here)
    ref_cache: dict | None = None if cfg.dpo.ref_cache else {}
    dpo = {
        r or cfg.dpo.folder(None): run_dpo(cfg, str(start), out / cfg.dpo.folder(r), r, ref_cache, resume)
        for r in recipes
    }
    t_train = time.perf_counter()
    if not world.main:  # generation and evaluation run on rank 0
        barrier(world)
        return PipelineResult(sft, dpo, [], {}, out / "summary.json")
    replies = {"before": sample_replies(cfg, start, cfg.eval.prompts)}
    for name, stage in dpo.items():
        replies[name] = sample_replies(cfg, stage.model_dir, cfg.eval.prompts)
    generations = [
        {"prompt": p, **{k: v[i] for k, v in replies.items()}} for i, p in enumerate(cfg.eval.prompts)
    ]
    start_name = "sft" if sft else "base"
    comparison = _compare(cfg, out, start_name, start, dpo) if cfg.dpo.recipe and cfg.dpo.data.eval else None
    t_end = time.perf_counter()
    stages = {**({"sft": sft} if sft else {}), **dpo}
    seconds = {
        "fetch": t_fetch - t0,
        "data": t_data - t_fetch,
        **{name: sum(stage.seconds.values()) for name, stage in stages.items()},
        "generate+eval": t_end - t_train,
        "total": t_end - t0,
    }
    summary = {
        "sft_model": str(sft.model_dir) if sft else None,
        "start_model": str(start),
        "seconds": seconds,
        "stage_seconds": {name: stage.seconds for name, stage in stages.items()},
        "generations": generations,
        "dpo": {
            name: {
                "model": str(stage.model_dir),
                "metrics": stage.metrics,
                "before": stage.before.as_dict() if stage.before else None,
                "after": stage.after.as_dict() if stage.after else None,
            }
            for name, stage in dpo.items()
        },
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    barrier(world)
    return PipelineResult(sft, dpo, generations, seconds, path, comparison)
