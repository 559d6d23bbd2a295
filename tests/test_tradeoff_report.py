"""benchmarks/tradeoff.py writes docs/results.md's trade-off section from the runs' report.json
files: the targets' verdicts follow the numbers, missing runs are listed with their commands, and
the labels (so the run folders) of the grid started before LeNet-300-100 was added stay put."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reproduce  # noqa: E402
import tradeoff  # noqa: E402


def _report(runs: Path, label: str, accs, **cols) -> None:
    run = next(r for r in tradeoff.ALL_RUNS if r[0] == label)
    for seed, acc in enumerate(accs):
        out = runs / tradeoff.ds_of(run) / reproduce.slug(label) / f"s{seed}"
        out.mkdir(parents=True)
        row = {"accuracy": acc, "weight_sparsity": 0.0, "activation_sparsity": 0.5, "nonzero_macs": 416_520,
               "effective_macs": 256_000, "dense_macs": 416_520, "params": 61_706, "seconds": 60.0, **cols}
        (out / "report.json").write_text(json.dumps(row))


def test_the_section_states_each_target_from_the_numbers(tmp_path):
    runs, page = tmp_path / "runs", tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Results\n\nintro\n\n## Other\n")
    _report(runs, "dense", [0.990, 0.991, 0.992])
    _report(runs, "st3 90%", [0.989, 0.988, 0.990], weight_sparsity=0.9)       # -0.20: met (0.3)
    _report(runs, "st3 95%", [0.983, 0.984, 0.982], weight_sparsity=0.95)      # -0.80: missed (0.6)
    _report(runs, "gmp 90%", [0.988, 0.987, 0.991], weight_sparsity=0.9)
    _report(runs, "str wd=2e-3", [0.988, 0.988, 0.988], weight_sparsity=0.93)  # 93% at -0.30: met
    _report(runs, "sas (M=2)", [0.995, 0.996, 0.098], nonzero_macs=416_520)   # one seed at chance: diverged
    _report(runs, "narrow dense", [0.980, 0.981, 0.982], nonzero_macs=63_040)
    _report(runs, "narrow sas (M=2)", [0.985, 0.984, 0.986], nonzero_macs=63_040)  # +0.40 over its own dense
    _report(runs, "tl1 lam=1.0", [0.988, 0.988, 0.988], activation_sparsity=0.85)  # +35 points at -0.30
    _report(runs, "dual", [0.988, 0.988, 0.988], effective_macs=100_000)      # 76% fewer: missed
    _report(runs, "lenet300 dense", [0.983])
    tradeoff.write_section(runs, [0, 1, 2], page)
    text = page.read_text()
    lines = {ln.split("**")[1]: ln for ln in text.splitlines() if ln.startswith("- **")}
    assert lines["ST-3 at 90%, LeNet-5"].endswith("**met**.")
    assert lines["ST-3 at 95%, LeNet-5"].endswith("**missed**.")
    assert "not run yet" in lines["ST-3 at 90%, LeNet-300-100"]
    assert "90%: +0.03 (ST-3 higher on 2 of 3 seeds); 3 sparsities not run yet: **met** so far." in \
        lines["ST-3 ≥ GMP at every sparsity, LeNet-5"]
    assert lines["STR learns ≥ 90% at ≤ 0.5 points below dense, LeNet-5"].endswith("**met**.")
    assert "1 of 3 seeds diverged" in lines["SAS M=2 above dense at equal non-zero MACs, never diverging, LeNet-5"]
    assert lines["SAS M=2 above dense at equal non-zero MACs, never diverging, LeNet-5"].endswith("**missed**.")
    narrow = lines["SAS M=2 above dense at equal non-zero MACs, never diverging, LeNet-5 at width 0.25"]
    assert "+0.40 ± 0.10 (3 seeds) at 63,040 vs 63,040 non-zero MACs" in narrow and narrow.endswith("**met**.")
    assert "not run yet" in lines["SAS M=4 above dense at equal non-zero MACs, never diverging, LeNet-5 at width 0.25"]
    assert "+35.0 points at -0.30" in lines["Transformed-ℓ1: ≥ +30 points of activation sparsity at ≤ 0.5 points below dense"]
    assert lines["Transformed-ℓ1: ≥ +30 points of activation sparsity at ≤ 0.5 points below dense"].endswith("**met**.")
    assert "76.0% fewer" in lines["Dual: ≥ 80% fewer effective MACs at ≤ 0.5 points below dense"]
    # the curves land next to the page, the section before the other sections, missing runs listed
    assert (page.parent / "img" / "tradeoff-weights-mnist.png").stat().st_size > 1000
    assert "![weight methods" in text and text.index("<!-- begin:tradeoff -->") < text.index("## Other")
    assert "--recipe activation-hoyer --set lam=1.0 --out runs/reproduce/mnist10/hoyer-lam-1-0/s0" in text
    assert "--model lenet300" in text and "--recipe nm-2-4 --set n=1" in text


def test_the_running_grid_keeps_its_labels_and_folders():
    first = [r[0] for r in tradeoff.RUNS[:27]]
    assert first[:4] == ["dense", "st3 80%", "st3-sigma 80%", "gmp 80%"]
    assert first[13:] == ["nm 2:4", "str wd=5e-4", "str wd=2e-3", "str wd=5e-3", "sas (M=2)", "sas (M=4)",
                          "dense 2x wide", "tl1 lam=0.01", "tl1 lam=0.1", "tl1 lam=1.0", "dual",
                          "semi-structured 0.1", "semi-structured 0.2", "semi-structured 0.3"]
    assert all(tradeoff.ds_of(r) == "mnist10" for r in tradeoff.RUNS)
    assert len({r[0] for r in tradeoff.ALL_RUNS}) == len(tradeoff.ALL_RUNS)
