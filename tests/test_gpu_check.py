"""``make gpu-check``'s script in its CPU dry run (tiny models, float32): it runs end to end and
writes the JSON and markdown summaries with every section, so the command that has to work on a
GPU machine on the first try is exercised here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_dry_run_writes_the_summaries(tmp_path):
    rc = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--recipes", "gmp"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, result["correctness"]
    assert [(r["model"], r["recipe"], r["ok"]) for r in result["correctness"]] == [
        ("resnet18", "gmp", True), ("vit_b_16", "gmp", True)]
    assert len(result["correctness"][0]["losses_cpu"]) == len(result["correctness"][0]["losses"])
    assert {(r["model"], r["recipe"]) for r in result["bench"] if "step_ms" in r} == {
        ("resnet50", "dense"), ("resnet50", "gmp"), ("vit_b_16", "dense"), ("vit_b_16", "gmp")}
    assert "CUDA" in result["sas_2_4"]["skipped"] and "CUDA" in result["nm_2_4"]["skipped"]
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Correctness", "## Training step vs dense", "## N:M 2:4", "## SAS as 2:4"):
        assert heading in md


def test_dry_run_passes_every_recipe(tmp_path):
    # the check itself must hold for every method (a penalty read without autograd, a method's
    # extra state in the round trip), or the GPU run reports failures that are the script's own
    rc = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--models", "resnet18", "--skip-bench"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["recipe"] for r in result["correctness"] if not r["ok"]] == [], result["correctness"]
    assert rc == 0 and len(result["correctness"]) == len(gpu_check.sparsify.builtin_recipes())


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "LOSS_RTOL", -1.0)  # no loss can agree
    rc = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--recipes", "gmp", "--skip-bench",
                         "--models", "vit_b_16"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1
    assert [r["model"] for r in result["correctness"]] == ["vit_b_16"]
    assert all(not r["ok"] and "first loss" in r["problems"][0] for r in result["correctness"])
    assert "**no**" in (tmp_path / "gpu_check.md").read_text()


def test_sparsify_works_without_jsonschema_and_says_so(no_jsonschema):
    """The GPU image has no jsonschema: recipes then skip the schema check with a warning."""
    import pytest
    import torch

    import sparsify
    with pytest.warns(UserWarning, match="jsonschema is not installed"):
        m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "st3", total_steps=10)
    assert type(m[0]).__name__ == "ST3Linear"
