"""Core edges a one-line change would silently alter: the masked-weight cache sees an in-place mask
change, ``.double()`` frees a layer's reused buffers, ``sparsify.sync`` forgets the averaged copy's
cached effective weights and warns at exactly the documented lag share, the effective weight
recomputed in backward is not kept after it, the inputs saved around a recomputed weight reach the
user's saved-tensor hooks, and an activation holding a buffer inside an untraceable parent keeps
its state_dict key."""
from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.buffers import layer_buffers
from sparsify.core.layers import SparseWeightMixin


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def sparse(recipe: str, model: nn.Module | None = None, **kw) -> nn.Module:
    model = mlp() if model is None else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(model, recipe, example_inputs=(torch.zeros(1, 8),), total_steps=4, **kw)


def make_transient(model: nn.Module) -> nn.Module:
    """Layers that keep nothing between calls (FSDP2's): their effective weight is recomputed in backward."""
    for m in model.modules():
        if isinstance(m, SparseWeightMixin):
            layer_buffers(m).make_transient()
    return model


# -- masked-weight cache (sparsify.core.layers.masked_weight) --------------------------------------

def test_a_mask_zeroed_in_place_between_forwards_is_used_by_the_next_forward():
    """A user who edits a layer's mask in place sees the next forward compute with the new mask."""
    m = sparse("gmp").eval()
    x = torch.randn(3, 8)
    layer = m.get_submodule("0")
    with torch.no_grad():
        before = m(x)
        assert not torch.equal(layer(x), layer.bias.expand(3, 8))  # the mask keeps weights now
        layer.mask.zero_()
        got = layer(x)
        after = m(x)
    assert torch.equal(got, layer.bias.expand(3, 8)), "the forward after mask.zero_() used the old mask"
    assert not torch.equal(before, after)


# -- .to() / .double() free the reused buffers (SparseWeightMixin._apply) ------------------------

def test_double_frees_the_float32_buffers_and_computes_in_float64():
    """After ``model.double()`` a layer holds no float32 buffer from earlier forwards and computes in float64."""
    m = sparse("gmp")
    x = torch.randn(3, 8)
    m(x).sum().backward()  # fills the layer's reused buffers (the mask's float copy, W ⊙ M)
    layer = m.get_submodule("0")
    assert layer_buffers(layer).names() != []
    m.double()
    bufs = layer_buffers(layer, create=False)
    assert bufs is None or bufs.names() == [], f"stale buffers after .double(): {bufs.names()}"
    assert bufs is None or [t.dtype for t in bufs.held()] == []
    with torch.no_grad():
        got = m(x.double())
        a, b = m.get_submodule("0"), m.get_submodule("2")
        want = F.linear(F.relu(F.linear(x.double(), a.weight * a.mask, a.bias)), b.weight * b.mask, b.bias)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


# -- sparsify.sync forgets the averaged copy's cached effective weights ---------------------------

def test_sync_after_a_write_through_data_makes_the_average_compute_with_its_new_weights():
    """An EMA whose weights a tool wrote through ``.data`` computes, once synced, with those weights."""
    model = sparse("str", s_init=-3.0)  # STR's soft threshold in play from the start
    ema = copy.deepcopy(model).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        old = ema(x)  # caches the effective weights of its STR layers
    opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=5e-4), lr=0.5)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    sparsify.step(model, loss)
    with torch.no_grad():  # an averaging tool's update, written where no version counter sees it
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.data.lerp_(pm.data, 0.5)
    sparsify.sync(ema, model)
    with torch.no_grad():
        got = ema(x)
        want = copy.deepcopy(ema)(x)  # a copy starts without cached effective weights
    assert not torch.equal(want, old)
    assert torch.equal(got, want), "the synced EMA computed with the effective weights cached before the update"


# -- the sync lag warning's threshold (sparsify.core.averaging.lag_warning) ------------------------

def synced_with_lag(lagging: int, kept: int) -> list[str]:
    """The messages ``sparsify.sync`` warns when the copy's layers report ``(lagging, kept)``."""
    model = sparse("gmp")
    ema = copy.deepcopy(model)
    layers = [m for m in ema.modules() if isinstance(m, SparseWeightMixin)]
    layers[0].averaged_lag = lambda: (lagging, kept)
    for other in layers[1:]:
        other.averaged_lag = lambda: (0, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sync(ema, model)
    return [str(w.message) for w in caught if "lags the sparsity schedule" in str(w.message)]


def test_sync_warns_when_exactly_ten_percent_of_the_kept_weights_lag():
    """docs/averaging.md: a lag of 10% or more of the kept weights is warned about, 10% itself included."""
    msgs = synced_with_lag(1, 10)
    assert len(msgs) == 1, "no lag warning at exactly 10% of the kept weights"
    assert "1 of the 10 weights" in msgs[0]


@pytest.mark.parametrize("lagging, kept", [(1, 11), (99, 1000), (0, 10)])
def test_sync_does_not_warn_below_ten_percent(lagging, kept):
    """A lag under 10% of the kept weights stays quiet."""
    assert synced_with_lag(lagging, kept) == []


# -- effective weights recomputed in backward (sparsify.core.recompute) ---------------------------

def test_the_weight_recomputed_in_backward_is_not_kept_after_it():
    """A graph kept for a second backward does not hold a weight-sized tensor recomputed in the first."""
    model = make_transient(sparse("gmp"))
    computed = []
    for m in model.modules():
        if isinstance(m, SparseWeightMixin):
            def spy(fn=m._forward_weight):
                w = fn()
                computed.append((weakref.ref(w), torch.is_grad_enabled()))
                return w
            m._forward_weight = spy
    x = torch.randn(3, 8)
    loss = model(x).square().sum()
    n_forward = len(computed)
    loss.backward(retain_graph=True)
    again = computed[n_forward:]
    assert again and not any(grad for _, grad in again)  # recomputed in backward, without gradients
    gc.collect()
    alive = [ref() for ref, _ in again if ref() is not None]
    assert alive == [], f"{len(alive)} recomputed weight(s) still alive after backward: {[t.shape for t in alive]}"
    grads = [p.grad.clone() for p in model.parameters()]
    loss.backward()  # the retained graph computes them again
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, 2 * g)


def test_inputs_saved_around_a_recomputed_weight_reach_the_outer_saved_tensor_hooks():
    """A user's saved-tensor hooks (offloading, packing) see the inputs a recomputing layer saves."""
    model = make_transient(sparse("gmp", nn.Sequential(nn.Linear(8, 6))))
    ref = copy.deepcopy(model)
    x = torch.randn(3, 8)
    packed = []

    def pack(t):
        packed.append((tuple(t.shape), t.data_ptr()))
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().sum()
    loss.backward()
    assert ((3, 8), x.data_ptr()) in packed, f"the layer's input never reached the outer pack hook: {packed}"
    ref(x).square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


# -- activations inside untraceable parents (sparsify.core.activations.shell_activation) ----------

class ScaledGELU(nn.GELU):
    """An activation module holding a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return super().forward(x) * self.scale


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = ScaledGELU()

    def forward(self, x):
        if x.sum() > -1e9:
            return self.act(self.lin(x))
        return x


def test_an_activation_with_a_buffer_in_an_untraceable_parent_keeps_its_state_dict_key():
    """A checkpoint's ``1.act.scale`` stays that key in the sparsified model and loads into it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Gate(), nn.Linear(8, 4))
    m = sparse("tl1", net)
    keys = [k for k in m.state_dict() if k.endswith("scale")]
    assert keys == ["1.act.scale"], f"the activation's buffer moved: {keys}"
    sd = m.state_dict()
    sd["1.act.scale"] = torch.tensor(3.0)
    m.load_state_dict(sd)
    assert float(m.get_submodule("1.act").scale) == 3.0
    x = torch.randn(2, 8)
    with torch.no_grad():
        first, gate = m.get_submodule("0"), m.get_submodule("1")
        torch.testing.assert_close(gate(first(x)), F.gelu(gate.lin(first(x))) * 3.0)
