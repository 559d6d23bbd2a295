"""A fast subset of the zoo sweep (benchmarks/zoo.py, docs/coverage.md): odd graphs end to end.

Each case runs the sweep's own pipeline (sparsify in train mode, one SGD step with penalty and
step, report, finalize with its output check) with ST-3 on a small input.
"""
from __future__ import annotations

import importlib.util
import pathlib
import warnings

import pytest
import torch
import torchvision

import sparsify

_spec = importlib.util.spec_from_file_location(
    "zoo", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

CASES = [
    # (family, model, input shape): aux heads live only in train mode; inception-style branches
    ("classification", "googlenet", (2, 3, 64, 64)),
    # segmentation: dict output, dilated depthwise convs, hardswish/SE blocks
    ("segmentation", "deeplabv3_mobilenet_v3_large", (2, 3, 64, 64)),
    # video: Conv3d
    ("video", "r3d_18", (2, 3, 4, 16, 16)),
]


@pytest.mark.parametrize("family,name,shape", CASES, ids=[c[1] for c in CASES])
def test_odd_graph_end_to_end(family, name, shape):
    model = zoo.build_model(family, name)
    x = torch.randn(shape)
    rec = zoo.run_one(family, name, "st3", model, (x,))
    assert rec["status"] == "ok", rec
    assert rec["rewritten"] == rec["weight_layers"] == rec["report_layers"]
    assert rec["param_share"] == 1.0


def test_detection_backbone_sparsified_through_fallback():
    """The root does not trace (it loops over the image list): its children are traced one by
    one and the backbone, RPN and box head are rewritten inside; training and finalize work."""
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64)
    image = torch.randn(3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(model, "st3", total_steps=10, example_inputs=([image],))
    assert not [w for w in caught if "could not trace" in str(w.message)]  # a weight recipe loses nothing there
    plan = sparsify.core.state.find_state(m).plan
    assert plan.fallbacks[0]["name"] == ""  # the root
    rewritten = {e.name for e in plan.rewritten}
    assert "backbone.body.0.0" in rewritten and any(n.startswith("backbone.fpn.") for n in rewritten)
    assert any(n.startswith("rpn.head.") for n in rewritten)
    assert plan.shares()["param_share"] > 0.9
    loss = zoo.train_step("detection", "fasterrcnn", m, ([image],))
    assert loss == loss  # finite, not NaN
    final = sparsify.finalize(m, ([image],), rtol=1e-3, atol=1e-4)
    assert not any(type(x).__module__.startswith("sparsify") for x in final.modules())



@pytest.mark.parametrize("name", ["r3d_18", "mc3_18"])
def test_the_coverage_table_of_sas_on_3d_resnets_is_what_plan_finds(name):
    """docs/coverage.jsonl (which docs/coverage.md is written from) said SAS rewrote 4 layers of
    r3d_18 and mc3_18 (1% and 3% of the weights), from a sweep older than SAS's Conv3d support;
    plan finds 20 (99.9%, 99.8%)."""
    cached = zoo.load_cache(str(pathlib.Path(__file__).resolve().parents[1] / "docs" / "coverage.jsonl"))
    x = torch.randn(zoo._candidates("video", name)[0])  # the sweep's input: the first candidate that ran
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = sparsify.plan(zoo.build_model("video", name), "sas", total_steps=10, example_inputs=(x,)).shares()
    assert cached[(name, "sas")]["param_share"] == pytest.approx(found["param_share"], abs=1e-3)
