"""``sparsify demo`` (what ``make demo`` runs): dense and every built-in recipe on 8x8 digits
with the small CNN, one comparison table and one PNG.

Recipes are discovered at run time (``sparsify.builtin_recipes()``), so a newly added recipe is
in the demo without touching this file. A recipe that fails is shown with its error in its row;
the others still run.

>>> rows = run_demo(tempfile.mkdtemp(), epochs=1, recipes=["st3"], quiet=True)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch

from sparsify.prepare.recipe import builtin_recipes
from sparsify.app.results import counted, thousands
from sparsify.app.resume import CONFIG
from sparsify.app.settings import DEMO_EPOCHS
from sparsify.app.train import TrainConfig, train

__all__ = ["run_demo", "format_table", "DEMO_EPOCHS"]



def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _achieved(r: dict) -> str:
    """What the run's methods sparsify, e.g. ``weights 90.0%`` or ``input slots 50.0%``."""
    got = r.get("achieved") or {}
    return "; ".join(f"{kind} {_pct(v)}" for kind, v in got.items()) or "-"


def format_table(rows: list[dict]) -> str:
    """The comparison table (plain text, also valid Markdown). MACs are per sample, named as in
    docs/macs.md: *dense*, *non-zero-weight* (``sparsify.report``), *effective* (weight and input
    activation both non-zero, measured on the test set) and *executed* (what dense hardware runs:
    SAS runs M x its narrow layers)."""
    head = ["run", "test acc", "sparsified (achieved)", "weight sparsity", "act. sparsity",
            "params (non-zero / all)", "dense MACs", "non-zero-weight MACs", "effective MACs", "executed MACs", "time"]
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append([r["name"], "failed"] + ["-"] * (len(head) - 3) + [f"{r['seconds']:.1f}s"])
            continue
        lines.append([r["name"], _pct(r["accuracy"]), _achieved(r), _pct(r["weight_sparsity"]),
                      _pct(r["activation_sparsity"]), f"{thousands(r['nonzero_params'])} / {thousands(r['params'])}",
                      thousands(r["dense_macs"]), thousands(r["nonzero_macs"]), thousands(r["effective_macs"]),
                      thousands(r.get("executed_macs")), f"{r['seconds']:.1f}s"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    out = [fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines[1:]]
    errors = [f"  {r['name']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        out += ["", "failed runs:"] + errors
    return "\n".join(out)


MARKER = ".sparsify-demo"  # in a folder the demo writes: its runs may be replaced by the next demo


def _claim_demo_out(out_dir: Path) -> None:
    """Refuse a folder holding runs the demo did not write (``sparsify train --out`` runs it would
    replace); mark the folder as the demo's."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a folder")
    if out_dir.is_dir() and not (out_dir / MARKER).exists() and not (out_dir / "comparison.json").exists():
        runs = sorted(p.parent.name for p in out_dir.glob(f"*/{CONFIG}"))
        if runs:
            raise FileExistsError(f"--out {out_dir} holds runs the demo did not write ({', '.join(runs[:3])}); the "
                                  "demo replaces its runs' folders: give it another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("a sparsify demo folder: the next demo replaces its runs\n")


def _warned(warned: list[str] | None, run: Path) -> str:
    """The demo's runs are quiet: a run that warned says how often and where the warnings are.

    >>> _warned(["fc: every weight of 6 of its 10 outputs pruned"], Path("demo-out/st3")), _warned([], Path("x"))
    ('  (1 warning: demo-out/st3/report.json)', '')
    """
    if not warned:
        return ""
    return f"  ({len(warned)} warning{'s' if len(warned) > 1 else ''}: {run / 'report.json'})"


def _warm_up() -> None:
    """Pay once, before any run is timed, what the first run would pay alone: scikit-learn's import
    and the digits file (2-3 s), torch's first optimizer (it imports torch._dynamo, 2 s),
    matplotlib's import for the plots."""
    from sparsify.app.data import load_data
    from sparsify.app import plots  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    load_data("digits")
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def run_demo(out: str = "demo-out", *, epochs: int | None = None, seed: int = 0, progress: bool = False,
             recipes: list[str] | None = None, quiet: bool = False) -> list[dict]:
    """Train dense + each recipe (default: all built-ins) on digits; write ``comparison.json``,
    ``comparison.md`` and ``comparison.png`` in ``out`` and return the rows."""
    from sparsify.app.plots import plot_comparison
    say = (lambda *a, **k: None) if quiet else print
    out_dir = Path(out)
    _claim_demo_out(out_dir)
    epochs = epochs or DEMO_EPOCHS
    names = list(dict.fromkeys(["dense"] + (list(recipes) if recipes else list(builtin_recipes()))))
    threads = torch.get_num_threads()
    t0 = time.time()
    _warm_up()  # the time column compares runs: the first (dense) must not pay the imports of all
    rows = []
    say(f"sparsify demo: small CNN on 8x8 digits, {counted(epochs, 'epoch')} per run, "
        f"{counted(len(names), 'run')} -> {out_dir}/")
    for name in names:
        t = time.time()
        cfg = TrainConfig(model="cnn", recipe=None if name == "dense" else name, data="digits", epochs=epochs,
                          seed=seed, out=str(out_dir / name), progress=progress, threads=1,
                          overwrite=True,  # the demo owns its folder
                          device="cpu")  # its table's numbers are the CPU's (a small CNN: a GPU gains nothing)
        try:
            res = train(cfg, quiet=True)
            # Ctrl-C: the demo stops with the run (its checkpoint is kept); in a run's last epoch or
            # write-up the run finishes first (sigint), and the demo still stops
            if res.get("interrupted") or res.get("sigint"):
                say(f"  {name:<16} interrupted; the demo stops (rerun it to start over)")
                return [*rows, {"name": name, "interrupted": True}]
            row = {"name": name, "error": None, "seconds": time.time() - t,
                   **{k: res.get(k) for k in ("accuracy", "weight_sparsity", "activation_sparsity", "params",
                                              "nonzero_params", "dense_macs", "nonzero_macs", "effective_macs",
                                              "executed_macs", "achieved", "finalize", "warnings")}}
        except Exception as e:  # one failing recipe must not stop the demo
            row = {"name": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                   "traceback": traceback.format_exc(), "seconds": time.time() - t, "accuracy": None}
        rows.append(row)
        say(f"  {name:<16} " + (f"failed ({row['error']})" if row["error"] else
                                f"test acc {_pct(row['accuracy'])}, weight sparsity {_pct(row['weight_sparsity'])}, "
                                f"activation sparsity {_pct(row['activation_sparsity'])}") + f"  [{row['seconds']:.1f}s]"
            + _warned(row.get("warnings"), out_dir / name))
    torch.set_num_threads(threads)
    table = format_table(rows)
    total = time.time() - t0
    say("\n" + table)
    (out_dir / "comparison.md").write_text(table + "\n")
    (out_dir / "comparison.json").write_text(json.dumps({"epochs": epochs, "seed": seed, "seconds": total,
                                                         "rows": rows}, indent=2))
    plot_comparison(rows, out_dir / "comparison.png",
                    f"small CNN on digits, {counted(epochs, 'epoch')}, seed {seed}")
    say(f"\n{counted(len(rows), 'run')} in {total:.0f}s; table, plot and per-run reports in {out_dir}/ "
        "(comparison.md, comparison.png, <run>/report.json)")
    return rows
