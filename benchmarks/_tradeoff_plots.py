"""The curves of benchmarks/tradeoff.py: one PNG per comparison, mean ± std over seeds.

``s`` is tradeoff.summary()'s dict: label -> {"mean", "sd", "ws", "as", "nzm", "eff", "params", ...}
(accuracy and sparsities in %, MACs per image). Each function returns False when the runs it
needs are missing (nothing is drawn then).
"""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _kilo(ax, axis: str = "x") -> None:
    import matplotlib.ticker
    f = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:,.0f}k")
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(f)


def _dense_band(ax, d: dict, label: str = "dense") -> None:
    ax.axhspan(d["mean"] - d["sd"], d["mean"] + d["sd"], color="0.85", label=f"{label} {d['mean']:.2f} ± {d['sd']:.2f}")
    ax.axhline(d["mean"], color="0.4", lw=1)


def _floor(ax, pts: list[dict], d: dict, span: float = 6.0) -> float:
    """The y limit below which points are drawn at the floor (a diverged run would flatten the rest)."""
    low = min([p["mean"] - p["sd"] for p in pts if p["mean"] > d["mean"] - span] + [d["mean"] - d["sd"]]) - 0.3
    ax.set_ylim(low, max([p["mean"] + p["sd"] for p in pts] + [d["mean"] + d["sd"]]) + 0.2)
    return low


def _point(ax, p: dict, x: float, low: float, label: str, **kw) -> None:
    if p["mean"] < low:  # off the axis: a marker on the floor, the value written next to it
        ax.plot([x], [low], marker="v", ms=9, ls="", label=f"{label}: {p['mean']:.1f}% (below the axis)", **kw)
    else:
        ax.errorbar([x], [p["mean"]], yerr=[p["sd"]], marker="o", capsize=3, ls="", label=label, **kw)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def weights(s: dict, models: list[tuple[str, str]], methods, sparsities, path: Path) -> bool:
    """Accuracy vs weight sparsity and vs non-zero MACs, one row per (title, label prefix)."""
    models = [(t, pre) for t, pre in models if pre + "dense" in s]
    if not models:
        return False
    plt = _plt()
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.4 * len(models)), squeeze=False)
    for row, (title, pre) in zip(axes, models):
        d = s[pre + "dense"]
        for ax, key, xlabel in ((row[0], "ws", "weight sparsity (%)"), (row[1], "nzm", "non-zero MACs per image")):
            _dense_band(ax, d)
            pts_all = []
            for r in methods:
                pts = [s[f"{pre}{r} {round(100 * x)}%"] for x in sparsities if f"{pre}{r} {round(100 * x)}%" in s]
                pts_all += pts
                if pts:
                    ax.errorbar([p[key] for p in pts], [p["mean"] for p in pts], yerr=[p["sd"] for p in pts],
                                marker="o", capsize=3, label=r)
            extra = sorted(k for k in s if k.startswith(pre) and (k[len(pre):].startswith("nm ")
                                                                 or k[len(pre):].startswith("str ")))
            low = _floor(ax, pts_all + [s[k] for k in extra], d)
            for k in extra:
                _point(ax, s[k], s[k][key], low, k[len(pre):], mfc="none")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(title)
            if key == "nzm":
                ax.plot([d["nzm"]], [d["mean"]], "k*", ms=10, label="dense")
                _kilo(ax)
            else:
                ax.set_xlim(min([45] + [s[k]["ws"] - 5 for k in extra]), 100)  # nm 2:4 at 50% ... 98%, STR anywhere
            ax.grid(alpha=0.3)
        row[0].legend(loc="lower left", fontsize=8)
    _save(fig, path)
    return True


def sas(s: dict, panels: list[tuple[str, str, list[tuple[str, str]]]], path: Path) -> bool:
    """Accuracy vs non-zero MACs: SAS against dense nets of 1x, 2x and 4x the parameters, one panel
    per ``(title, dense label, runs)`` whose dense run is done."""
    panels = [p for p in panels if p[1] in s and any(k in s for k, _ in p[2])]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.6), squeeze=False)
    for ax, (title, dense, runs) in zip(axes[0], panels):
        d = s[dense]
        _dense_band(ax, d)
        low = _floor(ax, [s[k] for k, _ in runs if k in s], d)
        for k, name in runs:
            if k in s:
                _point(ax, s[k], s[k]["nzm"], low, f"{name}, {s[k]['params']:,.0f} params")
        ax.set_xlabel("non-zero MACs per image")
        ax.set_ylabel("test accuracy (%)")
        _kilo(ax)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"SAS vs dense at non-zero MACs ({title} / MNIST)")
    _save(fig, path)
    return True


def activations(s: dict, families: list[tuple[str, list[str]]], path: Path) -> bool:
    """Accuracy vs measured activation sparsity, one line per regularizer over its λ sweep."""
    if "dense" not in s or not any(k in s for _, ks in families for k in ks):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    d = s["dense"]
    _dense_band(ax, d)
    pts_all = [s[k] for _, ks in families for k in ks if k in s]
    low = _floor(ax, pts_all, d)
    ax.plot([d["as"]], [d["mean"]], "k*", ms=10, label=f"dense ({d['as']:.1f}% zeros)")
    for fam, (name, ks) in enumerate(families):
        pts = [(k, s[k]) for k in ks if k in s]
        if not pts:
            continue
        line = ax.errorbar([p["as"] for _, p in pts], [max(p["mean"], low) for _, p in pts],
                           yerr=[p["sd"] for _, p in pts], marker="o", capsize=3, label=name)
        for k, p in pts:
            clipped = f" ({p['mean']:.1f}%, below the axis)" if p["mean"] < low else ""
            # collapsed runs of every family land on one spot: stack their labels
            ax.annotate(k.split()[-1] + clipped, (p["as"], max(p["mean"], low)), textcoords="offset points",
                        xytext=(-160, 4 + 10 * fam) if clipped else (4, 4), fontsize=7, color=line[0].get_color())
    ax.set_xlabel("activation sparsity (% zeros at the inputs of Conv/Linear layers 2..n, test set)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Activation regularizers over λ (LeNet-5 / MNIST)")
    _save(fig, path)
    return True


def dual_semi(s: dict, eff_runs: list[str], semi: list[tuple[float, str]], path: Path) -> bool:
    """Left: accuracy vs effective (weight x activation) MACs. Right: semi-structured accuracy vs s."""
    if "dense" not in s:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    d = s["dense"]
    for ax in (a1, a2):
        _dense_band(ax, d)
    low = _floor(a1, [s[k] for k in eff_runs if k in s], d)
    for k in eff_runs:
        if k in s:
            _point(a1, s[k], s[k]["eff"], low, k, mfc="none" if k != "dual" else None)
    a1.set_xlabel("effective MACs per image (weight and input activation both non-zero)")
    a1.set_ylabel("test accuracy (%)")
    _kilo(a1)
    a1.grid(alpha=0.3)
    a1.legend(loc="lower right", fontsize=7)
    a1.set_title("Dual sparse training vs the single-sided methods")
    pts = [(x, s[k]) for x, k in semi if k in s]
    if pts:
        low2 = _floor(a2, [p for _, p in pts], d)
        a2.errorbar([x for x, _ in pts], [max(p["mean"], low2) for _, p in pts], yerr=[p["sd"] for _, p in pts],
                    marker="o", capsize=3, label="semi-structured")
    a2.set_xlabel("s (share of each conv's output positions masked)")
    a2.set_ylabel("test accuracy (%)")
    a2.grid(alpha=0.3)
    a2.legend(loc="lower left", fontsize=8)
    a2.set_title("Semi-structured activation sparsity")
    _save(fig, path)
    return True
