"""Metric loggers: JSONL always; TensorBoard and Weights & Biases (offline) when turned on."""

from __future__ import annotations

import math
import time

from criteriapo.config import TrackingConfig
from criteriapo.tracking.loggers import build_loggers, read_metrics
from criteriapo.tracking.plots import plot_run


def test_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    loggers = build_loggers(
        tmp_path,
        TrackingConfig(tensorboard=True, wandb=True, wandb_mode="offline"),
        name="test",
        config={"beta": 0.1},
    )
    for step in (1, 2, 3):
        loggers.log(step, {"loss": 1.0 / step, "rewards/accuracies": step / 3, "grad_norm": math.nan})
    loggers.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert (
        [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 1 / 3 and rows[0]["grad_norm"] == "nan"
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    (offline,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # for a later `wandb sync`
    # wandb's own service process writes the file; on a busy machine it may land just after finish()
    deadline = time.monotonic() + 60
    while offline.read_bytes().count(b"rewards/accuracies") < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert offline.read_bytes().count(b"rewards/accuracies") >= 3  # the three logged steps


def test_plots_are_drawn_from_metrics(tmp_path):
    loggers = build_loggers(tmp_path, TrackingConfig(), name="t", config={})
    for step in range(1, 6):
        loggers.log(
            step,
            {
                "loss": 1 / step,
                "rewards/chosen": 0.1 * step,
                "rewards/rejected": -0.1 * step,
                "rewards/margins": 0.2 * step,
                "rewards/accuracies": 1.0,
            },
        )
    loggers.close()
    written = plot_run(tmp_path)
    assert {p.name for p in written} == {"loss.png", "rewards.png", "accuracy.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
