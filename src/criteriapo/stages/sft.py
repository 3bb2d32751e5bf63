"""The SFT stage."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from criteriapo.config import Config
from criteriapo.stages.common import (
    Plan,
    StageResult,
    begin,
    train_and_export,
)
from criteriapo.train.tasks import SFTTask

log = logging.getLogger(__name__)


def run_sft(
    cfg: Config, model_spec: str | None = None, run_dir: Path | None = None, resume: bool = False
) -> StageResult:
    model_spec = model_spec or cfg.model.name_or_path
    run_dir = Path(run_dir or Path(cfg.output_dir) / "sft")
    s = begin(cfg, model_spec, cfg.sft, "sft", run_dir, resume=resume)
    t1 = time.perf_counter()
    if s.done is not None:
        return StageResult(run_dir, run_dir / "model", s.done["metrics"], {"prepare": t1 - s.t0})
    task = SFTTask(s.prep.tokenizer.pad_token_id, s.prep.packing)
    plan = Plan(task, s.prep.train, s.prep.evals, label="sft", method="SFT")
    model_dir, metrics, _, seconds = train_and_export(cfg, cfg.sft, "sft", run_dir, s, plan)
    return StageResult(run_dir, model_dir, metrics, {"prepare": t1 - s.t0, **seconds})
