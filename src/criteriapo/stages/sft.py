"""The SFT stage: the sequence of every stage (:func:`criteriapo.stages.common.run_stage`) with the
``sft`` entry of :data:`criteriapo.stages.methods.METHODS` and its plan, the task alone."""

from __future__ import annotations

import time
from pathlib import Path

from criteriapo.config import Config
from criteriapo.stages.common import Plan, StageResult, Started, run_stage
from criteriapo.stages.methods import METHODS

SFT = METHODS["sft"]


def run_sft(
    cfg: Config, model_spec: str | None = None, run_dir: Path | None = None, resume: bool = False
) -> StageResult:
    model_spec = model_spec or cfg.model.name_or_path
    run_dir = Path(run_dir or Path(cfg.output_dir) / SFT.folder(None))
    return run_stage(cfg, SFT, model_spec, run_dir, lambda s: _plan(cfg, s), resume=resume)


def _plan(cfg: Config, s: Started) -> Plan:
    """The task; nothing to do before training."""
    seconds = {"prepare": time.perf_counter() - s.t0}
    task = SFT.task(s.prep.tokenizer.pad_token_id, s.prep.packing)
    describe = SFT.describe(cfg.sft, None)
    return Plan(task, s.prep.train, s.prep.evals, label=SFT.name, method=describe, seconds=seconds)
