"""The SFT stage."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from criteriapo.config import Config, to_dict
from criteriapo.distributed import (
    init_world,
)
from criteriapo.export import ModelCard
from criteriapo.resume import record_finished, stage_checkpointer
from criteriapo.stages.common import (
    StageResult,
    finish,
    prepare,
    progress_bar,
    stage_loggers,
)
from criteriapo.train.loop import Trainer
from criteriapo.train.tasks import SFTTask

log = logging.getLogger(__name__)


def run_sft(
    cfg: Config, model_spec: str | None = None, run_dir: Path | None = None, resume: bool = False
) -> StageResult:
    model_spec = model_spec or cfg.model.name_or_path
    run_dir = Path(run_dir or Path(cfg.output_dir) / "sft")
    t0 = time.perf_counter()
    world = init_world()
    prep = prepare(cfg, model_spec, cfg.sft, "sft", run_dir, resume=resume, world=world)
    source, tokenizer, train = prep.source, prep.tokenizer, prep.train
    ck, latest, done = stage_checkpointer(cfg, "sft", cfg.sft, model_spec, run_dir, train, world, resume)
    if done is not None:
        return StageResult(run_dir, run_dir / "model", done["metrics"], {"prepare": time.perf_counter() - t0})
    loggers = stage_loggers(cfg, run_dir, "sft", world)
    trainer = Trainer(
        prep.model,
        SFTTask(tokenizer.pad_token_id, prep.packing),
        train,
        cfg.sft.optim,
        cfg.sft.train,
        loggers,
        prep.evals,
        progress_bar(cfg, "sft", world),
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
    model_dir = finish(cfg, cfg.sft, trainer, run_dir, tokenizer, card, source)
    record_finished(run_dir, ck, {"metrics": metrics}, cfg.sft.train.keep_final_checkpoint, world)
    seconds = {"prepare": t1 - t0, "train": t2 - t1, "export": time.perf_counter() - t2}
    return StageResult(run_dir, model_dir, metrics, seconds)
