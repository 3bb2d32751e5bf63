"""PNG plots of a run's metrics, drawn from ``metrics.jsonl`` at the end."""

from __future__ import annotations

from pathlib import Path

from criteriapo.tracking.loggers import read_metrics

PANELS = {
    "loss.png": [("loss", "train"), ("eval/loss", "eval")],
    "rewards.png": [
        ("rewards/chosen", "chosen"),
        ("rewards/rejected", "rejected"),
        ("rewards/margins", "margin"),
        ("eval/rewards/margins", "eval margin"),
    ],
    "accuracy.png": [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "eval")],
}


def plot_run(run_dir: Path) -> list[Path]:
    """Write one PNG per panel that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for filename, series in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
                drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(f"{run_dir.name}: {filename.removesuffix('.png')}")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(run_dir / filename, dpi=100)
            written.append(run_dir / filename)
        plt.close(fig)
    return written
