"""Exact resume for every weight method: train k steps, save model + optimizer state, rebuild
with ``sparsify`` on a fresh model, load, continue; everything equals the uninterrupted run."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify

TOTAL, K = 12, 5

# (recipe, overrides): schedules put ramps, fix points and mask moves on both sides of step K
CASES = {
    "st3": ("st3", dict(begin=1, end=8, fix=10, sparsity=0.8)),
    "st3-sigma": ("st3-sigma", dict(begin=2, end=6, fix=None)),
    "str-layer": ("str", dict(s_init=-3.0)),
    "str-channel": ("str", dict(s_init=-3.0, granularity="channel")),
    "str-global": ("str-global", dict(s_init=-3.0)),
    "gmp-global": ("gmp", dict(begin=2, end=9, fix=None)),
    "gmp-layer-fix": ("gmp", dict(begin=1, end=6, fix=9, scope="layer", sparsity=0.7, frequency=2)),
    "gmp-block": ("gmp", dict(begin=0, end=8, fix=None, block=[2, 4])),
    "nm-2-4": ("nm-2-4", dict(begin=2, fix=9, decay=2e-4)),
    "nm-1-4": ("nm-2-4", dict(n=1, begin=0, fix=None)),
}


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))


def batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 8, (4,), generator=g)


def build(case: str, seed: int):
    recipe, kw = CASES[case]
    m = sparsify.sparsify(net(seed), recipe, total_steps=TOTAL, example_inputs=torch.zeros(1, 4, 8, 8), **kw)
    opt = torch.optim.SGD(sparsify.param_groups(m, 5e-3), lr=0.2, momentum=0.9)
    return m, opt


def run(m, opt, steps: range):
    for t in steps:
        x, y = batch(t)
        loss = F.cross_entropy(m(x), y) + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), f"{what}: {k} differs"
        elif isinstance(va, dict):
            assert_same(va, vb, f"{what}.{k}")
        else:
            assert va == vb, f"{what}: {k}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_is_bit_exact(case):
    ref, ref_opt = build(case, seed=0)
    run(ref, ref_opt, range(TOTAL))

    first, first_opt = build(case, seed=0)
    run(first, first_opt, range(K))
    saved = roundtrip({"model": first.state_dict(), "opt": first_opt.state_dict()})

    resumed, resumed_opt = build(case, seed=123)  # a fresh model: other weights, step 0
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    run(resumed, resumed_opt, range(K, TOTAL))

    assert_same(ref.state_dict(), resumed.state_dict(), "model")
    assert_same(ref_opt.state_dict()["state"], resumed_opt.state_dict()["state"], "optimizer")
    x, _ = batch(99)
    ref.eval()
    resumed.eval()
    assert torch.equal(ref(x), resumed(x))
    r1, r2 = sparsify.report(ref).to_dict(), sparsify.report(resumed).to_dict()
    assert r1 == r2 and r1["step"] == TOTAL
    # the run did something: weights are sparse (STR: thresholds moved)
    assert r1["totals"]["weight_sparsity"] > 0.05, case
