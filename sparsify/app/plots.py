"""PNG plots of a training run and of the demo's comparison (matplotlib, Agg backend: no display).

>>> import tempfile, os
>>> p = plot_history([{"epoch": 1, "test_acc": 0.5, "weight_sparsity": 0.2}], os.path.join(tempfile.mkdtemp(), "h.png"))
>>> os.path.getsize(p) > 0
True
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsify.app.checkpoint import _tmp_name  # noqa: E402
from sparsify.app.summary import shown_kind  # noqa: E402

__all__ = ["plot_layers", "plot_history", "plot_comparison"]


def _save(fig, path) -> str:
    """Through a temporary file and ``os.replace``: a Ctrl-C or a full disk while writing leaves the
    previous plot, or none, never half a PNG."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return str(path)


def plot_layers(weight: dict[str, float | None], activation: dict[str, float], path, title: str = "",
                targets: dict[str, float | None] | None = None, label: str = "weight sparsity") -> str:
    """Two bar charts: per-layer sparsity of what the recipe sparsifies (``weight``: achieved, with
    each layer's scheduled target marked when ``targets`` has one) and per-layer measured
    input-activation sparsity."""
    names = list(dict.fromkeys(list(weight) + list(activation)))
    height = max(3.0, 0.28 * len(names) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    pos = list(range(len(names)))
    axes[0].barh(pos, [100 * (weight.get(n) or 0.0) for n in names], color="tab:blue", label="achieved")
    marked = [(p, 100 * targets[n]) for p, n in zip(pos, names) if targets and targets.get(n) is not None]
    if marked and len({t for _, t in marked}) == 1 and len(marked) > 1:
        # one target for every layer (a global threshold spreads it unevenly over the layers)
        axes[0].axvline(marked[0][1], color="black", ls="--", lw=1, label="target (whole rule)")
        axes[0].legend(fontsize=8, loc="lower right")
    elif marked:
        axes[0].scatter([t for _, t in marked], [p for p, _ in marked], marker="|", s=200, color="black",
                        zorder=3, label="target")
        axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"{label} (% zeros)")
    axes[1].barh(pos, [100 * activation.get(n, 0.0) for n in names], color="tab:orange")
    axes[1].set_title("layer-input sparsity (% zeros, measured)")
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
    for key, label, style in (("weight_sparsity", "weights (achieved)", "-o"), ("target", "weights (scheduled)", "--"),
                              ("activation_sparsity", "layer inputs (measured)", "-o")):
        if any(h.get(key) for h in history):
            a2.plot(ep, [100 * (h.get(key) or 0) for h in history], style, label=label)
    # what other methods sparsify (SAS slots, masked positions, regularized activations)
    for kind in dict.fromkeys(k for h in history for k in (h.get("achieved") or {}) if k != "weights"):
        a2.plot(ep, [100 * ((h.get("achieved") or {}).get(kind) or 0) for h in history], "-s",
                label=shown_kind(kind, adjective=False))
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
    """The trade-off: test accuracy against MACs per sample (% of dense), one point per run (runs
    on the same point share one label), the dense run as the reference lines; left: non-zero-weight
    MACs, right: effective MACs (weight and activation non-zero). Names as in docs/macs.md; the
    executed MACs (SAS: M x dense) are in the table."""
    rows = [r for r in rows if r.get("accuracy") is not None]
    dense = next((r for r in rows if r["name"] == "dense"), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, key, what in ((axes[0], "nonzero_macs", "non-zero-weight MACs"),
                          (axes[1], "effective_macs", "effective MACs (weight x activation non-zero)")):
        points: dict[tuple, list[str]] = {}
        for r in rows:
            if r.get(key) is None or not r.get("dense_macs"):
                continue
            x, y = 100 * r[key] / r["dense_macs"], 100 * r["accuracy"]
            ax.scatter([x], [y], s=70 if r is dense else 40, color="black" if r is dense else "tab:blue",
                       zorder=4 if r is dense else 3)
            # runs within 3% of each other at the same accuracy share one label
            points.setdefault((round(x / 3), round(y, 2)), [x, y, []])[2].append(r["name"])
        for i, (x, y, names) in enumerate(sorted(points.values(), key=lambda p: (p[0], p[1]))):
            # neighbours alternate above and below their point
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 else -11),
                        fontsize=7)
        if dense is not None:
            ax.axhline(100 * dense["accuracy"], color="gray", lw=0.8, ls="--", label="dense accuracy")
            ax.axvline(100.0, color="gray", lw=0.8, ls=":", label="dense MACs")
        ax.set_xlabel(f"{what}, % of dense")
        ax.set_xlim(0, 110)
        ax.margins(y=0.15)
        ax.grid(alpha=0.3)
        if dense is not None:  # the reference lines are the only labelled artists
            ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("test accuracy (%)")
    if title:
        fig.suptitle(f"{title}: accuracy against MACs (up and left is better)")
    return _save(fig, path)
