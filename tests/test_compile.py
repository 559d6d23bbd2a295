"""torch.compile (CPU inductor): a sparsified model trains with the same loss trajectory as eager.

Inductor compiles C++ on this machine; the two recipes below (a weight method with moving
thresholds and an activation method with random masks) take about 30-60 s together on 2 cores.
Graph breaks per recipe are listed in docs/compile.md (benchmarks/compile_breaks.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
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


def assert_states_match(got: nn.Module, want: nn.Module) -> None:
    """Float state within the trajectories' tolerance; masks, steps and other integer state equal."""
    for (k, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


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
    assert got_totals.pop("method_params") == want_totals.pop("method_params")
    assert got_totals == pytest.approx(want_totals)
    assert_states_match(compiled_model, eager)
    final = sparsify.finalize(compiled)
    torch.testing.assert_close(torch.compile(final)(data()[0][0]), final(data()[0][0]), rtol=1e-4, atol=1e-5)


def sas_cnn():
    """Each path the SAS kernel takes: a conv, a depthwise conv (one conv per slot), a strided 1x1
    conv (reads a subsample), a head through the average pool."""
    torch.manual_seed(0)
    block = lambda cin, cout, k, **kw: [nn.Conv2d(cin, cout, k, **kw), nn.BatchNorm2d(cout), nn.ReLU()]  # noqa: E731
    return nn.Sequential(*block(3, 16, 3, stride=2, padding=1), *block(16, 32, 3, padding=1),
                         *block(32, 32, 3, padding=1, groups=32), *block(32, 32, 1, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


# N:M read its fixed flag with bool(), SAS ran its own kernel (out= writes into slot views, a
# shared workspace, autograd.grad for M > 2), STR asked torch.amp.is_autocast_available (which
# torch 2.11's dynamo skips): 27 to 41 graph breaks on resnet18 each.
@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_every_recipe_compiles_to_one_graph(recipe):
    resnet = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), recipe, total_steps=4)
    train(resnet, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))])  # eager: the layers' buffers and caches exist
    for autocast in (False, True):
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explained = torch._dynamo.explain(resnet)(torch.randn(2, 3, 32, 32))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (autocast, explained.break_reasons)
        # a guard on the buffers' weak map recompiled whenever other layers came or went, and
        # crashed building the guard (IndexError) when one was collected during the trace
        assert not [g.name for g in explained.out_guards if "_LAYERS" in g.name]


# The recipes whose layers run other code under compile (N:M: torch.where on the fixed flag; SAS:
# its reference forward) train as eager does; before, SAS's per-layer recompiles also hit dynamo's
# limit. aot_eager traces forward and backward as inductor does, without building C++.
# (Trajectories are compared on a small CNN: resnet18 at batch 8 from scratch turns a 1e-6 weight
# perturbation into 4% gradient differences at its first step.)
@pytest.mark.parametrize("recipe, extra", [("nm-2-4", dict(fix=0.5)), ("sas", {}), ("sas-m4", {})])
def test_recipes_that_broke_the_graph_compile_whole_and_train_as_eager(recipe, extra):
    torch._dynamo.reset()
    make = lambda: sparsify.sparsify(sas_cnn(), recipe, total_steps=STEPS,  # noqa: E731
                                     example_inputs=torch.zeros(1, 3, 16, 16), **extra)
    eager, compiled_model = make(), make()
    assert len(sparsify.report(eager).layers) >= 3  # the paths above are sparse (N:M leaves the 3-channel stem and the depthwise conv dense)
    expected = train(eager, data())
    got = train(compiled_model, data(), call=torch.compile(compiled_model, backend="aot_eager"))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert_states_match(compiled_model, eager)
    if recipe == "nm-2-4":  # both phases ran: straight-through, then the fixed mask
        assert all(bool(m.fixed) for m in compiled_model.modules() if hasattr(m, "fixed"))


def test_a_sweep_compiles_every_model():
    """One function (TracedModule.__call__) served every traced model and dynamo guarded it on
    the model's class: from the 9th sparsified model compiled in a process (its recompile_limit)
    on, compiled models ran eager. Each model now compiles its own graph's forward."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with torch._dynamo.config.patch(recompile_limit=2):
        for i in range(4):
            m = sparsify.sparsify(tiny_cnn(), "gmp", total_steps=10, example_inputs=x[:1])
            train(m, [(x, y)], call=torch.compile(m, backend="eager"))
            assert counters["stats"]["unique_graphs"] == i + 1, dict(counters["frames"])
