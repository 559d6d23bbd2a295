"""A layer the code both calls and reads the weight of directly (``h = self.fc(x) + x @
self.fc.weight.t()`` in a forward torch.fx cannot trace). Swapped, it trained with its dense
weight at the read while finalize stored the pruned one: no warning from sparsify() even with
example_inputs (only layers never called were watched), and finalize called the 44-65% difference
rounding that top-k or NMS amplifies (a FinalizeWarning, the model returned). Now the layer stays
dense, said as for a layer only read; without example inputs finalize raises, naming the read."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparsify
import sparsify.prepare.direct_reads as direct_reads_module
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import find_state
from sparsify.deploy.divergence import locate_divergence
from loops import run_steps


class CalledAndRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace the root
            h = h + x @ self.fc.weight.t()  # reads fc's weight directly as well
        return self.out(torch.relu(h))


class Traceable(CalledAndRead):
    """The same read in a graph: a get_attr, rewired to the sparse weight (prepare/hidden.py)."""

    def forward(self, x):
        return self.out(torch.relu(self.fc(x) + x @ self.fc.weight.t()))


class Checked(nn.Module):
    """T5's ``if x.dtype != self.wo.weight.dtype``: reads the weight's dtype, not its values."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.wi(x))
        if h.sum() > -1e9 and h.dtype != self.wo.weight.dtype and self.wo.weight.shape[0] > 0:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class TiedHead(nn.Module):
    """A head whose weight is the embedding's, in an untraceable forward: the embedding's own call
    reads it, which is no direct read."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        if ids.sum() >= 0:  # untraceable
            h = torch.relu(self.mid(h))
        return self.head(h)


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def _sparsify(net, recipe="gmp", **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(net, recipe, total_steps=4, **kw)
    return m, [str(w.message) for w in caught]


@pytest.mark.parametrize("recipe", ["gmp", "st3"])
def test_a_called_layer_read_directly_stays_dense_and_finalizes_equal(recipe):
    torch.manual_seed(0)
    m, said = _sparsify(CalledAndRead(), recipe, example_inputs=X, begin=0, end=0, sparsity=0.5)
    direct = [s for s in said if "reads its weight directly" in s]
    assert len(direct) == 1 and "(fc)" in direct[0], said
    assert not isinstance(m.fc, SparseWeightMixin) and isinstance(m.out, SparseWeightMixin)
    entry = next(e for e in find_state(m).plan.entries if e.name == "fc")
    assert entry.method is None and "read directly by the code around it (t)" in entry.reason
    run_steps(m, torch.optim.SGD(sparsify.param_groups(m), lr=0.1), [(X, None)] * 4, penalty=True,
              loss_of=lambda x, _: m(x).pow(2).mean())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = sparsify.finalize(m, X)
    assert not [w for w in caught if issubclass(w.category, sparsify.FinalizeWarning)]
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(X), final(X))


def test_the_plan_says_it_too():
    plan = sparsify.plan(CalledAndRead(), "gmp", example_inputs=X, total_steps=4)
    by_name = {e.name: e for e in plan.entries}
    assert by_name["fc"].method is None and by_name["out"].method == "magnitude"


@pytest.mark.parametrize("net", [Checked(), TiedHead()], ids=["dtype-check", "tied-head"])
def test_reads_of_a_weight_s_metadata_or_inside_its_holder_s_call_do_not_count(net):
    x = torch.randint(0, 20, (2, 5)) if isinstance(net, TiedHead) else X
    m, said = _sparsify(net, "gmp", example_inputs=x)
    assert not [s for s in said if "directly" in s], said
    assert isinstance(m.get_submodule("wo" if isinstance(net, Checked) else "mid"), SparseWeightMixin)
    assert not [e for e in find_state(m).plan.entries if "read directly" in e.reason]


def test_a_read_in_a_graph_is_rewired_not_refused():
    torch.manual_seed(0)
    m, said = _sparsify(Traceable(), "gmp", example_inputs=X, begin=0, end=0, sparsity=0.5)
    assert not [s for s in said if "directly" in s], said
    assert isinstance(m.fc, SparseWeightMixin)
    final = sparsify.finalize(m, X)  # the read computes with the pruned weight in both
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(X), final(X))


def test_a_traced_torchvision_model_costs_no_watched_forward(monkeypatch):
    runs = []
    real = direct_reads_module.run_eval
    monkeypatch.setattr(direct_reads_module, "run_eval", lambda *a, **k: runs.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 32, 32)
    _, said = _sparsify(torchvision.models.resnet18(num_classes=10), "gmp", example_inputs=x)
    assert runs == [] and not [s for s in said if "directly" in s]
    _sparsify(CalledAndRead(), "gmp", example_inputs=X)
    assert runs == [1]  # eager code: watched


def test_finalize_names_the_direct_read_sparsify_could_not_see():
    """Without example inputs nothing is watched and fc is rewritten: finalize's check finds the
    difference starting in the root's own code, which reads fc.weight, and refuses the model
    instead of calling the difference amplified rounding."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(CalledAndRead(), "gmp", total_steps=4, begin=0, end=0, sparsity=0.5)
    assert isinstance(m.fc, SparseWeightMixin)
    final = sparsify.finalize(m, check=False)
    d = locate_divergence(m.eval(), final, (X,))
    assert d.own and d.reads == [("", "fc.weight")] and not d.amplified_only, d
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsify.FinalizeWarning)
        with pytest.raises(sparsify.FinalizeError, match=r"it starts in the code of <root>, which reads fc\.weight "
                                                         r"directly, outside a call of fc.*\"name\": \"fc\""):
            sparsify.finalize(m, X)

