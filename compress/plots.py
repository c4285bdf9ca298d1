"""PNG plots of a run, for people who would rather look than read."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_write_with


def plot_training(metrics: list[dict], path: str | Path) -> None:
    """Accuracy, group sparsity, λ and learning rate over epochs (refreshed each epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return
    ep = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(ep, [100 * m["accuracy"] for m in metrics], "o-", label="eval accuracy (structured point)")
    ax1.plot(ep, [100 * m["group_sparsity"] for m in metrics], "s-", label="group sparsity")
    ax1.plot(ep, [100 * m["weighted_group_sparsity"] for m in metrics], "^-", label="weighted group sparsity")
    if all("cost" in m for m in metrics):
        ax1.plot(ep, [100 * m["cost"] for m in metrics], "d--", label="cost (fraction of dense)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("%")
    ax1.set_ylim(-2, 102)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.semilogy(ep, [m["lr"] for m in metrics], "o-", label="learning rate")
    lams = [m.get("lam", 0.0) for m in metrics]
    if any(v > 0 for v in lams):
        ax2.semilogy(ep, [max(v, 1e-12) for v in lams], "s-", label="λ")
    ax2.set_xlabel("epoch")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
