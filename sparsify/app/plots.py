"""PNG plots of a training run and of the demo's comparison (matplotlib, Agg backend: no display).

>>> import tempfile, os
>>> p = plot_history([{"epoch": 1, "test_acc": 0.5, "weight_sparsity": 0.2}], os.path.join(tempfile.mkdtemp(), "h.png"))
>>> os.path.getsize(p) > 0
True
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_layers", "plot_history", "plot_comparison"]


def _save(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_layers(weight: dict[str, float | None], activation: dict[str, float], path, title: str = "") -> str:
    """Two bar charts: per-layer weight sparsity and per-layer input-activation sparsity."""
    names = list(dict.fromkeys(list(weight) + list(activation)))
    height = max(3.0, 0.28 * len(names) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    pos = list(range(len(names)))
    axes[0].barh(pos, [100 * (weight.get(n) or 0.0) for n in names], color="tab:blue")
    axes[0].set_title("weight sparsity (% zeros)")
    axes[1].barh(pos, [100 * activation.get(n, 0.0) for n in names], color="tab:orange")
    axes[1].set_title("input activation sparsity (% zeros)")
    axes[0].set_yticks(pos, names, fontsize=7)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_history(history: list[dict], path, title: str = "") -> str:
    """Accuracy (train, test) and sparsity (weights achieved and scheduled, activations) per epoch."""
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("train_acc", "train"), ("test_acc", "test")):
        if any(h.get(key) is not None for h in history):
            a1.plot(ep, [100 * (h.get(key) or 0) for h in history], marker="o", label=label)
    a1.set_title("accuracy (%)")
    a1.set_xlabel("epoch")
    for key, label in (("weight_sparsity", "weights (achieved)"), ("target", "weights (scheduled)"),
                       ("activation_sparsity", "activations")):
        if any(h.get(key) is not None for h in history):
            a2.plot(ep, [100 * (h.get(key) or 0) for h in history], marker="o", label=label)
    a2.set_title("sparsity (% zeros)")
    a2.set_xlabel("epoch")
    a2.set_ylim(0, 100)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_comparison(rows: list[dict], path, title: str = "") -> str:
    """One bar group per run: test accuracy, weight and activation sparsity, and the share of
    dense MACs left (non-zero weights; and with activation zeros skipped too)."""
    rows = [r for r in rows if r.get("accuracy") is not None]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, max(3.5, 0.35 * len(names) + 1.5)), sharey=True)
    pos = list(range(len(names)))
    axes[0].barh(pos, [100 * r["accuracy"] for r in rows], color="tab:green")
    lo = min([100 * r["accuracy"] for r in rows] or [0])
    axes[0].set_xlim(max(0, lo - 10), 100)
    axes[0].set_title("test accuracy (%)")
    w = 0.4
    axes[1].barh([p - w / 2 for p in pos], [100 * (r.get("weight_sparsity") or 0) for r in rows], w, label="weights")
    axes[1].barh([p + w / 2 for p in pos], [100 * (r.get("activation_sparsity") or 0) for r in rows], w,
                 label="activations")
    axes[1].set_xlim(0, 100)
    axes[1].set_title("sparsity (% zeros)")
    axes[1].legend(fontsize=8)

    def share(r, key):
        return 100 * r[key] / r["dense_macs"] if r.get(key) is not None and r.get("dense_macs") else 0
    axes[2].barh([p - w / 2 for p in pos], [share(r, "nonzero_macs") for r in rows], w, label="non-zero weights")
    axes[2].barh([p + w / 2 for p in pos], [share(r, "effective_macs") for r in rows], w,
                 label="non-zero weight x activation")
    axes[2].set_title("MACs left (% of dense)")
    axes[2].legend(fontsize=8)
    axes[0].set_yticks(pos, names, fontsize=8)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
