"""What every stage does around its training, whatever its method (read from its entry in
:data:`criteriapo.stages.methods.METHODS`): check everything that can fail fast and load the model
(:func:`prepare`), loggers and progress, and the end (plots, export with a model card); the sequence
of them all is :func:`run_stage`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from criteriapo.config import Config, DPOConfig, SFTConfig, to_dict
from criteriapo.criteria.pairs import RecipeOptions
from criteriapo.data.tokenize import ChatTokenizer
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
from criteriapo.eval.preference import PreferenceEval
from criteriapo.export import ExportError, ModelCard, export_model
from criteriapo.models import load_model, load_tokenizer, resolve_model
from criteriapo.models.loading import ModelSource, pick_device, pick_dtype
from criteriapo.models.lora import apply_lora, for_export, trainable_parameters
from criteriapo.models.norms import fuse_rms_norms
from criteriapo.models.training import disable_dropout, enable_activation_checkpointing
from criteriapo.resume import FINISHED, guard_unfinished, record_finished, stage_checkpointer
from criteriapo.stages.data import tokenized
from criteriapo.stages.methods import Method
from criteriapo.tracking.loggers import Loggers, build_loggers
from criteriapo.tracking.plots import plot_run
from criteriapo.tracking.progress import ProgressBar
from criteriapo.train.checkpoint import Checkpoint
from criteriapo.train.guard import guard_model
from criteriapo.train.loop import Trainer, seed_everything
from criteriapo.train.precision import Precision, check_updates_survive, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    run_dir: Path
    model_dir: Path
    metrics: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    before: PreferenceEval | None = None  # DPO only: held-out preference of the starting model
    after: PreferenceEval | None = None


@dataclass
class Prepared:
    source: ModelSource
    tokenizer: Any
    model: Any
    train: list
    evals: list
    precision: Precision
    packing: bool
    # rows whose prompt was cut (or dropped) to fit max_length: {"train": {...}, "eval": {...}}
    data_counts: dict[str, dict[str, int]] = field(default_factory=dict)


def prepare(
    cfg: Config,
    model_spec: str,
    method: Method,
    run_dir: Path,
    recipe: str | None = None,
    resume: bool = False,
    world: World | None = None,
) -> Prepared:
    """Every check that can fail fast, in order: checkpoints, model folder, data, then the weights,
    then the guard (our log-probs and packing against the model's own forward)."""
    world, stage, section = world or init_world(), method.config(cfg), method.section
    check_batch(world, stage.train.batch_size, stage.train.micro_batch_size, section)
    guard_unfinished(run_dir / "checkpoints", resume, world)
    source, tokenizer, chat = chat_tokenizer(cfg, model_spec)
    if not stage.data.train:
        raise ConfigError(f"{section}.data.train is empty: name at least one data file (or builtin:NAME)")
    run_dir.mkdir(parents=True, exist_ok=True)
    # a rerun into the same folder starts clean; a resumed one keeps its metrics (trimmed later)
    for stale in (
        (("bad_rows.jsonl",) if resume else ("bad_rows.jsonl", "metrics.jsonl", FINISHED))
        if world.main
        else ()
    ):
        (run_dir / stale).unlink(missing_ok=True)
    barrier(world)
    kind = method.data_kind
    ropts = recipe_options(stage) if recipe else None
    report = run_dir if world.main else None  # one report, from rank 0
    made = (model_spec, stage.criteria_data) if method.criteria else (None, None)
    counts: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    where = {"world": world, "device": cfg.model.device}  # where criteria data is sampled, if made
    train = tokenized(
        stage.data, stage.data.train, kind, chat, report, recipe, ropts, *made, counts["train"], **where
    )
    evals = tokenized(
        stage.data, stage.data.eval, kind, chat, report, recipe, ropts, *made, counts["eval"], **where
    )
    method.prepare(train, evals, stage)
    seed_everything(stage.train.seed)
    model, precision = _load_for_training(cfg, source, method, world)
    probe = method.as_pairs(train[:8])
    packing = guard_model(model, probe, section, tokenizer.pad_token_id, stage.train.packing)
    if world.distributed:
        model = shard(model, fsdp_dtype(precision))
    return Prepared(source, tokenizer, model, train, evals, precision, packing, counts)


def _load_for_training(cfg: Config, source: ModelSource, method: Method, world: World):
    """The weights in the stage's precision on its device, with activation checkpointing, LoRA and
    dropout as configured; bf16-true checked to keep the learning rate's updates."""
    stage = method.config(cfg)
    device = device_for(world, cfg.model.device)
    precision = resolve_precision(
        stage.train.precision, pick_dtype(cfg.model.dtype, pick_device(device)), stage.lora.enabled
    )
    model = load_model(
        source, dtype=precision.weights, device=device, trust_remote_code=cfg.model.trust_remote_code
    )
    fuse_rms_norms(model)  # the same forward; fewer passes over memory on a CPU in float32
    if stage.train.gradient_checkpointing:
        enable_activation_checkpointing(model, stage.train.keep_attention, stage.train.keep_projections)
    if stage.lora.enabled:
        model = apply_lora(model, stage.lora)
        trainable, total = trainable_parameters(model)
        log.info("LoRA: %d of %d parameters train (%.2f%%)", trainable, total, 100 * trainable / total)
    if method.dropout_off(stage):  # after LoRA: its adapters have dropout of their own
        disable_dropout(model)
    if precision.name == "bf16-true":
        check_updates_survive(model, stage.optim, method.section)
    return model, precision


def fsdp_dtype(precision: Precision):
    """FSDP2 gathers bf16-mixed weights in bf16 (half the traffic); every model of a run is sharded
    alike, so a frozen reference computes as the policy does."""
    return precision.autocast if precision.name == "bf16-mixed" else None


def chat_tokenizer(cfg: Config, model_spec: str):
    source = resolve_model(model_spec, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.chat_template:
        path = Path(cfg.model.chat_template)
        if not path.is_file():
            raise ConfigError(f"model.chat_template: no such file {path}")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    chat = ChatTokenizer(tokenizer, eos_ids(source), name=model_spec)
    return source, tokenizer, chat


def recipe_options(d: DPOConfig) -> RecipeOptions:
    return RecipeOptions(d.mini_size, d.mini_min_margin, d.criterion_weights, d.condition_on_criterion)


def eos_ids(source: ModelSource) -> list[int]:
    path = source.path / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def write_config(run_dir: Path, cfg: Config) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def finish(
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


def progress_bar(cfg: Config, label: str, world: World) -> ProgressBar | None:
    return ProgressBar(label) if cfg.tracking.progress and world.main else None


def stage_loggers(cfg: Config, run_dir: Path, name: str, world: World) -> Loggers:
    if not world.main:
        return Loggers([])
    write_config(run_dir, cfg)
    return build_loggers(run_dir, cfg.tracking, f"{Path(cfg.output_dir).name}-{name}", to_dict(cfg))


@dataclass
class Started:
    """A stage checked and loaded (:func:`begin`), with its checkpointer; ``done``: the record of the
    same run finished before (nothing to train), ``latest``: the checkpoint to go on from."""

    prep: Prepared
    world: World
    checkpointer: Any
    latest: Checkpoint | None
    done: dict | None
    t0: float


def begin(
    cfg: Config,
    model_spec: str,
    method: Method,
    run_dir: Path,
    recipe: str | None = None,
    resume: bool = False,
) -> Started:
    """Every stage's start: :func:`prepare`, then its checkpointer, and on resume what it finds."""
    t0 = time.perf_counter()
    world = init_world()
    prep = prepare(cfg, model_spec, method, run_dir, recipe, resume, world)
    run = {"recipe": recipe} if method.criteria else {}
    stage = method.config(cfg)
    ck, latest, done = stage_checkpointer(
        cfg, method.section, stage, model_spec, run_dir, prep.train, world, resume, **run
    )
    return Started(prep, world, ck, latest, done, t0)


@dataclass
class Plan:
    """What a stage trains and how its model card describes it (see :func:`train_and_export`)."""

    task: Any
    train: list
    evals: list
    label: str  # of the progress bar
    method: str  # the model card's
    eval_task: Any = None
    notes: list[str] = field(default_factory=list)
    extra_state: dict[str, Any] = field(default_factory=dict)  # tensors saved with every checkpoint
    # after training, the stage's own results (kept in finished.json) from the metrics (it may add
    # to them) and the final evaluation's scores of the eval examples (the trainer's eval_scores)
    results: Callable[[dict[str, float], Any], dict[str, Any]] | None = None
    # the seconds before training, from the stage's start: prepare (and the preference stages' reference)
    seconds: dict[str, float] = field(default_factory=dict)


def train_and_export(
    cfg: Config, stage: SFTConfig | DPOConfig, name: str, run_dir: Path, s: Started, plan: Plan
) -> tuple[Path, dict[str, float], dict[str, Any], dict[str, float]]:
    """The sequence every stage shares: loggers, the trainer (restored on resume), training, the
    stage's results, the model card, export, the finished record. Returns the model folder, the
    metrics, the results and the seconds of training and export."""
    prep, world = s.prep, s.world
    t0 = time.perf_counter()  # the trainer's set-up (optimizer, loggers) and a restore count as training
    trainer = Trainer(
        prep.model,
        plan.task,
        plan.train,
        stage.optim,
        stage.train,
        stage_loggers(cfg, run_dir, name, world),
        plan.evals,
        progress_bar(cfg, plan.label, world),
        eval_task=plan.eval_task,
        checkpointer=s.checkpointer,
        world=world,
        precision=prep.precision,
        extra_state=plan.extra_state or None,
    )
    if s.latest is not None:
        s.checkpointer.restore(trainer, s.latest)
    metrics = trainer.train()
    t1 = time.perf_counter()
    results = plan.results(metrics, trainer.eval_scores) if plan.results else {}
    card = ModelCard(
        name=f"{Path(cfg.output_dir).name}-{name}",
        base_model=prep.source.spec,
        method=plan.method,
        datasets=stage.data.train,
        hyperparameters=to_dict(stage),
        metrics=metrics,
        notes=plan.notes,
    )
    model_dir = finish(cfg, stage, trainer, run_dir, prep.tokenizer, card, prep.source)
    keep = stage.train.keep_final_checkpoint
    done = {"metrics": metrics, "data": prep.data_counts, **results}
    record_finished(run_dir, s.checkpointer, done, keep, world)
    return model_dir, metrics, results, {"train": t1 - t0, "export": time.perf_counter() - t1}


def run_stage(
    cfg: Config,
    method: Method,
    model_spec: str,
    run_dir: Path,
    plan: Callable[[Started], Plan],
    recipe: str | None = None,
    resume: bool = False,
) -> StageResult:
    """The sequence of every stage, SFT and the preference methods alike: :func:`begin` (checks, data,
    model, checkpointer); unless the same run finished before, ``plan`` (the method's task, after the
    work it needs first: the preference stages score their reference), then :func:`train_and_export`."""
    s = begin(cfg, model_spec, method, run_dir, recipe, resume)
    if s.done is not None:
        seconds = {"prepare": time.perf_counter() - s.t0}
        return StageResult(run_dir, run_dir / "model", s.done["metrics"], seconds, *_evaluations(s.done))
    p = plan(s)
    stage = method.config(cfg)
    model_dir, metrics, results, seconds = train_and_export(cfg, stage, method.name, run_dir, s, p)
    return StageResult(run_dir, model_dir, metrics, {**p.seconds, **seconds}, *_evaluations(results))


def _evaluations(results: dict[str, Any]) -> tuple[PreferenceEval | None, PreferenceEval | None]:
    """The held-out preference before and after training, where the stage's results have them."""
    before, after = (PreferenceEval(**results[k]) if results.get(k) else None for k in ("before", "after"))
    return before, after
