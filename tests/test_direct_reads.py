"""A Conv/Linear layer whose weight the code around it reads directly inside a forward torch.fx
could not trace (Mamba's ``dt_proj.weight @ x``) stays dense, said once: swapped, it trained with
its dense weight there while finalize stored the pruned one (gmp: finalized output off by 69%,
with a finalize warning blaming rounding)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin
from loops import run_steps


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.proj = nn.Linear(16, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.inp(x)
        if h.sum() > -1e9:  # data-dependent: torch.fx cannot trace this module
            h = F.linear(h, self.proj.weight)
        return h


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.head = Mixer(), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mix(x)))


X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("recipe", ["st3", "gmp", "str", "dual", "nm-2-4"])
def test_a_layer_read_directly_stays_dense_and_the_model_finalizes_equal(recipe):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(Net(), recipe, example_inputs=(X,), total_steps=4)
    said = [str(w.message) for w in caught if "reads its weight directly" in str(w.message)]
    assert len(said) == 1 and "(mix.proj)" in said[0], said
    assert not isinstance(m.mix.proj, SparseWeightMixin) and isinstance(m.mix.inp, SparseWeightMixin)
    entry = next(e for e in sparsify.core.state.find_state(m).plan.entries if e.name == "mix.proj")
    assert entry.method is None and "read directly by the code around it (linear)" in entry.reason
    run_steps(m, torch.optim.SGD(sparsify.param_groups(m), lr=0.1), [(X, None)] * 4, penalty=True,
              loss_of=lambda x, _: m(x).pow(2).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head's pruned rows
        final = sparsify.finalize(m, (X,))  # its output check passes: no rounding story needed
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(X), final(X))


def test_the_plan_lists_it_and_a_layer_not_run_at_all_is_rewritten():
    class Unused(Net):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(4, 4)

        def forward(self, x):
            out = super().forward(x)
            return out + self.aux(out) if self.training else out  # not run by the eval check: not read either

    plan = sparsify.plan(Unused(), "st3", example_inputs=(X,), total_steps=4)
    by_name = {e.name: e for e in plan.entries}
    assert by_name["mix.proj"].method is None and by_name["aux"].method == "st3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say without example inputs: nothing is known
        m = sparsify.sparsify(Unused(), "st3", total_steps=4)
    assert isinstance(m.mix.proj, SparseWeightMixin)


def test_mamba_reads_dt_proj_and_conv1d_weights_directly():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.MambaConfig(vocab_size=100, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                   conv_kernel=4)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(transformers.MambaForCausalLM(cfg), "gmp", example_inputs={"input_ids": ids},
                              total_steps=4)
    (said,) = [str(w.message) for w in caught if "directly" in str(w.message)]
    assert said.startswith("sparsify: 4 layers stay dense")
    mixer = m.backbone.layers[0].mixer
    assert not isinstance(mixer.dt_proj, SparseWeightMixin) and not isinstance(mixer.conv1d, SparseWeightMixin)
    assert isinstance(mixer.in_proj, SparseWeightMixin) and isinstance(mixer.out_proj, SparseWeightMixin)


class ByName(nn.Module):
    """Mamba's mixer: its ``act`` module exists, but the forward applies the activation by name."""

    def __init__(self):
        super().__init__()
        self.inp, self.act, self.gate = nn.Linear(16, 32), nn.SiLU(), nn.ReLU()
        self.activation = "silu"

    def forward(self, x):
        h = self.inp(x)
        if h.sum() > -1e9:  # untraceable
            h = getattr(F, self.activation)(h)
        return self.gate(h)


def test_an_activation_module_the_forward_never_calls_gets_no_regularizer():
    """Its one-call graph never ran: the penalty stayed 0 and every sparsify.step said the loop
    trained another model."""
    net = nn.Sequential(ByName(), nn.Linear(32, 4))
    m = sparsify.sparsify(net, "tl1", example_inputs=(X,), total_steps=4, capture="fx")
    names = {e.name for e in sparsify.core.state.find_state(m).plan.rewritten}
    assert "0.gate" in names and "0.act" not in names, names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the loop trains another model"
        run_steps(m, torch.optim.SGD(sparsify.param_groups(m), lr=0.1), [(X, None)] * 3, penalty=True,
                  loss_of=lambda x, _: m(x).pow(2).mean())
