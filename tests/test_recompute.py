"""Effective weights recomputed in backward (sparsify.core.recompute): a layer that keeps nothing
between calls (FSDP2's) trains bitwise as one that keeps its buffers, while autograd keeps no
effective weight from its forward to its backward; activation checkpointing, save_on_cpu and a
second backward still work. Here the layers are made transient by hand on one process; under
FSDP2 itself, tests/test_fsdp.py (bitwise equal to DDP) and benchmarks/fsdp_memory.py."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify.core.buffers import layer_buffers
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.recompute import recomputed
from strategies import build_model, count_example, example_input, model_specs

WEIGHT_RECIPES = ["gmp", "st3", "st3-sigma", "nm-2-4", "str", "str-global", "dual"]


def make_transient(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, SparseWeightMixin):
            layer_buffers(m).make_transient()
    return model


def train(model, x, steps, lr=0.05):
    opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=5e-4), lr=lr)
    for _ in range(steps):
        out = model(x)
        loss = out.float().pow(2).mean() + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model, float(loss))
    return model


def saved_bytes(model, x) -> int:
    """Bytes of the storages autograd saves in a forward, parameters and registered buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10))


def sparse(recipe, model=None):
    kw = {"s_init": -3.0} if recipe.startswith("str") else {}  # STR's soft threshold in play from the start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(cnn() if model is None else model, recipe, total_steps=4, **kw)


@given(spec=model_specs(), recipe=st.sampled_from(WEIGHT_RECIPES), steps=st.integers(1, 5))
def test_transient_layers_train_bitwise_as_kept_ones(spec, recipe, steps):
    """Every weight method, through its schedule (4 steps: ST-3's fix, dual's pruning, N:M's
    fixed masks included): the same parameters, buffers and outputs."""
    count_example()
    x = example_input(spec)
    kept = sparse(recipe, build_model(spec))
    transient = make_transient(sparse(recipe, build_model(spec)))
    train(kept, x, steps)
    train(transient, x, steps)
    a, b = kept.state_dict(), transient.state_dict()
    assert [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])] == []
    assert torch.equal(kept(x), transient(x))


@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_no_effective_weight_is_saved_for_backward(recipe):
    """Kept layers save their effective weights (a reused buffer, so no new memory); transient
    ones saved a fresh one per layer, a whole unsharded copy under FSDP2. Now they save what the
    dense model saves (its activations), within a few scalars."""
    x = torch.randn(2, 3, 16, 16)
    dense = saved_bytes(cnn(), x)
    weights = sum(m.weight.numel() * 4 for m in cnn().modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d,
                                                                                  nn.Linear)))
    model = make_transient(train(sparse(recipe), x, 3))
    assert saved_bytes(model, x) <= dense + 64
    with_weights = train(sparse(recipe), x, 3)  # a kept layer's saved buffer: counted here, not new memory
    assert saved_bytes(with_weights, x) >= dense + weights // 2


@pytest.mark.parametrize("outer", ["checkpoint", "save_on_cpu", "retain_graph"])
@pytest.mark.parametrize("recipe", ["st3", "nm-2-4", "str"])
def test_outer_saved_tensor_hooks_and_a_second_backward(recipe, outer):
    """The hooks compose with those active outside: non-reentrant activation checkpointing and
    save_on_cpu get every other saved tensor; a graph backpropagated twice recomputes twice."""
    x = torch.randn(2, 3, 16, 16)
    ref = make_transient(train(sparse(recipe), x, 2))
    ref.zero_grad(set_to_none=True)
    model = copy.deepcopy(ref)
    make_transient(model)
    ref(x).square().sum().backward()
    if outer == "checkpoint":
        torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).square().sum().backward()
    elif outer == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu():
            y = model(x)
        y.square().sum().backward()
    else:
        y = model(x).square().sum()
        y.backward(retain_graph=True)
        y.backward()
        for p in model.parameters():
            p.grad /= 2
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), name


def test_views_of_the_weight_are_rebuilt_with_their_strides():
    """F.linear saves the transposed weight (a view): it comes back as that view."""
    w = torch.randn(5, 7, requires_grad=True)
    mask = torch.rand(5, 7) > 0.3
    x = torch.randn(3, 7, requires_grad=True)
    with recomputed(lambda: w * mask) as r:
        y = F.linear(x, r.weight())
    y.pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.linear(x, w * mask).pow(2).sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_the_forwards_effective_weights_are_freed_before_the_backward(recipe):
    """Nothing, the graph included, holds a transient layer's effective weight once its forward
    returned (saved-bytes counting alone would miss a reference kept elsewhere)."""
    import weakref
    x = torch.randn(2, 3, 16, 16)
    model = make_transient(train(sparse(recipe), x, 3))
    alive = []
    for m in model.modules():
        if isinstance(m, SparseWeightMixin):
            fn = m._forward_weight if recipe != "dual" else m.effective_weight

            def spy(fn=fn, layer=m):
                w = fn()
                if w is not layer.weight:
                    alive.append(weakref.ref(w))
                return w
            setattr(m, "_forward_weight" if recipe != "dual" else "effective_weight", spy)
    loss = model(x).square().sum()
    assert alive and [r for r in alive if r() is not None] == []
    loss.backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, SparseWeightMixin))
