"""Metric loggers sharing one small interface: ``log(step, metrics)`` and ``close()``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from criteriapo.config import TrackingConfig
from criteriapo.errors import ConfigError


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """One JSON object per line in ``metrics.jsonl``; flushed each time so nothing is lost on a crash."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tracking.tensorboard is on but tensorboard is not installed: "
                "pip install 'criteriapo[tracking]'"
            ) from None
        self._w = SummaryWriter(str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


class WandbLogger:
    """Weights & Biases; ``offline`` by default (sync later with ``wandb sync``)."""

    def __init__(self, run_dir: Path, project: str, mode: str, name: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "tracking.wandb is on but wandb is not installed: pip install 'criteriapo[tracking]'"
            ) from None
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(project=project, name=name, mode=mode, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class Loggers:
    """Fans one call out to every logger."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build_loggers(run_dir: Path, cfg: TrackingConfig, name: str, config: dict[str, Any]) -> Loggers:
    loggers: list[MetricLogger] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
    if cfg.wandb:
        loggers.append(WandbLogger(run_dir, cfg.wandb_project, cfg.wandb_mode, name, config))
    return Loggers(loggers)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
