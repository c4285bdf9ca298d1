"""PNG plots of a run, for people who would rather look than read."""

from __future__ import annotations

from pathlib import Path

from compress.files import atomic_write_with


def plot_training(metrics: list[dict], path: str | Path) -> None:
    """Accuracy, group sparsity, λ and learning rate over epochs (refreshed each epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return
    ep = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax1.plot(ep, [100 * m["accuracy"] for m in metrics], "o-", label="eval accuracy (structured point)")
    ax1.plot(ep, [100 * m["group_sparsity"] for m in metrics], "s-", label="group sparsity")
    ax1.plot(ep, [100 * m["weighted_group_sparsity"] for m in metrics], "^-", label="weighted group sparsity")
    if all("cost" in m for m in metrics):
        ax1.plot(ep, [100 * m["cost"] for m in metrics], "d--", label="cost (fraction of dense)")
        if "target" in metrics[-1]:
            ax1.axhline(100 * metrics[-1]["target"], color="grey", ls=":", lw=1, label="cost target")
    frozen = [m["epoch"] for m in metrics if m.get("phase") == "final"]
    for ax in (ax1, ax2) if frozen else ():
        ax.axvline(frozen[0] - 0.5, color="grey", ls="-.", lw=1, label="structure frozen" if ax is ax1 else None)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("%")
    ax1.set_ylim(-2, 102)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax2.semilogy(ep, [m["lr"] for m in metrics], "o-", label="learning rate")
    lams = [m.get("lam", 0.0) for m in metrics]
    if any(v > 0 for v in lams):
        ax2.semilogy(ep, [v if v > 0 else float("nan") for v in lams], "s-", label="λ")  # λ = 0: a gap, not 1e-12
    ax2.set_xlabel("epoch")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
