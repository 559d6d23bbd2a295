"""torch.compile (CPU inductor): a sparsified model trains with the same loss trajectory as eager.

Inductor compiles C++ on this machine; the two recipes below (a weight method with moving
thresholds and an activation method with random masks) take about 30-60 s together on 2 cores.
Graph breaks per recipe are listed in docs/compile.md (benchmarks/compile_breaks.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsify

from loops import train

STEPS = 4


def tiny_cnn():
    torch.manual_seed(0)
    # two sparse layers only: small graphs compile fast
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(STEPS)]




# st3's default 90% prunes 420 of the first conv's 432 weights: BatchNorm then divides channels
# left without weights by sqrt(eps), which turns inductor's float noise (1e-8, as for the dense
# model) into 1e-2 weight differences within 4 steps. At 70% both runs agree to 1e-7.
OVERRIDES = {"st3": dict(sparsity=0.7)}


@pytest.mark.parametrize("recipe", ["st3", "semi-structured"])
def test_compiled_training_matches_eager(recipe):
    torch._dynamo.reset()
    eager = sparsify.sparsify(tiny_cnn(), recipe, total_steps=STEPS, example_inputs=torch.zeros(1, 3, 16, 16),
                              **OVERRIDES.get(recipe, {}))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="inductor")
    expected = train(eager, data())
    got = train(compiled, data())  # sparsify's functions take the compiled wrapper too
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # the masks moved during the run, and moved the same way
    got_totals, want_totals = sparsify.report(compiled).to_dict()["totals"], sparsify.report(eager).to_dict()["totals"]
    assert got_totals.pop("empty_layers") == want_totals.pop("empty_layers")
    assert got_totals.pop("achieved") == pytest.approx(want_totals.pop("achieved"))  # approx takes no nested dict
    assert got_totals == pytest.approx(want_totals)
    for (k, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    final = sparsify.finalize(compiled)
    torch.testing.assert_close(torch.compile(final)(data()[0][0]), final(data()[0][0]), rtol=1e-4, atol=1e-5)
