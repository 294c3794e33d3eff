"""The loss curve of a run: RUN_DIR/loss_curve.png from its metrics.jsonl (train loss, validation loss)."""

from __future__ import annotations

from pathlib import Path

PLOT_FILE = "loss_curve.png"


def plot_losses(metrics_path: str | Path, out: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mor_ds.train.callbacks.metrics import read_metrics

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records]
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss (LM)", lw=1.5)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)  # a viewer never sees half a PNG
