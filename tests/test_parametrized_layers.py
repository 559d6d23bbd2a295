"""Layers whose weight a parametrization computes (``weight_norm``: wav2vec2's and HuBERT's
positional convolution). Before, every weight method raised AttributeError in ``sparsify`` ('ST3Conv1d'
object has no attribute 'weight') and the plan listed the parametrization's tensors as fused
experts; now such a layer stays dense, with its reason, and sparsify says so once."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from loops import run_steps

WEIGHT_RECIPES = ["st3", "st3-sigma", "gmp", "str", "str-global", "nm-2-4", "dual", "sas"]


class PosConv(nn.Module):
    """wav2vec2's shape: a projection, a weight-normed grouped conv over time, a head."""

    def __init__(self, legacy: bool = False):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        conv = nn.Conv1d(16, 16, 5, padding=2, groups=2)
        if legacy:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
                self.conv = nn.utils.weight_norm(conv, dim=2)
        else:
            self.conv = nn.utils.parametrizations.weight_norm(conv, dim=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: (batch, time, 8)
        h = torch.relu(self.proj(x))
        h = h + nn.functional.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h.mean(1))


def _x():
    return torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "legacy-hook"])
@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_a_weight_normed_layer_stays_dense_and_the_rest_trains_and_finalizes(recipe, legacy):
    torch.manual_seed(0)
    model = PosConv(legacy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(model, recipe, total_steps=3, example_inputs=(_x(),))
    said = [str(w.message) for w in caught if "their weight is computed, not a parameter" in str(w.message)]
    assert len(said) == 1 and "conv" in said[0], [str(w.message) for w in caught]
    assert ("remove_weight_norm(layer)" if legacy else "remove_parametrizations(layer, 'weight')") in said[0]
    plan = sparsify.core.state.find_state(m).plan
    dense = {e.name: e.reason for e in plan.dense}
    assert "weight is computed by" in dense["conv"]
    assert not any("parametrizations" in name for name in dense)  # its tensors are not listed again
    assert "weight is computed by" in str(plan)  # printed with the other dense layers
    assert type(m.conv).__name__.startswith("Parametrized") or hasattr(m.conv, "weight_g")  # left as it was
    # SAS takes layers fed by a relu: only the conv is, and it stays dense
    layers = {e.name for e in plan.rewritten if e.kind in ("Linear", "Conv1d")}
    assert layers == (set() if recipe == "sas" else {"proj", "head"})
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-2)
    run_steps(m, opt, [(_x(), None)] * 3, penalty=True, loss_of=lambda x, _: m(x).square().mean())
    m.eval()
    # the legacy hook left a weight computed in the last training forward (no graph leaf, which
    # torch's deepcopy refuses): finalize copies it detached
    final = sparsify.finalize(m, (_x(),))
    with torch.no_grad():
        torch.testing.assert_close(final(_x()), m(_x()), rtol=1e-4, atol=1e-5)


def test_removing_the_parametrization_first_sparsifies_the_layer():
    """What the warning suggests: the layer then holds a plain weight, which the recipe rewrites."""
    model = PosConv()
    nn.utils.parametrize.remove_parametrizations(model.conv, "weight")
    plan = sparsify.plan(model, "st3", example_inputs=(_x(),))
    assert "conv" in {e.name for e in plan.rewritten}


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_a_layer_pruned_with_torch_prune_says_how_to_take_it_in(recipe):
    # torch.nn.utils.prune leaves weight_orig x weight_mask behind a forward pre-hook: the layer
    # stays dense with one warning naming prune.remove (not weight_norm's advice), and after
    # prune.remove the layer is sparsified with its zeros kept
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    x = torch.randn(3, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(model, recipe, total_steps=3, example_inputs=(x,))
    said = [str(w.message) for w in caught if "computed, not a parameter" in str(w.message)]
    assert len(said) == 1 and "torch.nn.utils.prune.remove(layer, 'weight')" in said[0] and "L1Unstructured" in said[0]
    assert "weight_norm" not in said[0] and "parametrize" not in said[0]
    assert not [w for w in caught if "rewrote nothing" in str(w.message)]
    assert {e.name for e in sparsify.core.state.find_state(m).plan.rewritten} == {"2"}
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    run_steps(m, opt, [(x, None)] * 2, penalty=True, loss_of=lambda x, _: m(x).square().mean())
    final = sparsify.finalize(m)  # after a training forward, prune's weight is no graph leaf
    with torch.no_grad():
        torch.testing.assert_close(final(x), m.eval()(x))
    torch.nn.utils.prune.remove(model[0], "weight")
    assert float((model[0].weight == 0).float().mean()) == 0.5
    m = sparsify.sparsify(model, recipe, total_steps=3, example_inputs=(x,))
    assert {e.name for e in sparsify.core.state.find_state(m).plan.rewritten} == {"0", "2"}


def test_a_layer_under_torch_ao_pruning_says_squash_mask():
    from torch.ao.pruning import WeightNormSparsifier
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sp = WeightNormSparsifier(sparsity_level=0.5)
    sp.prepare(model, [{"tensor_fqn": "0.weight"}])
    sp.step()
    x = torch.randn(3, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(model, "st3", total_steps=3, example_inputs=(x,))
    said = [str(w.message) for w in caught if "computed, not a parameter" in str(w.message)]
    assert len(said) == 1 and "FakeSparsity" in said[0] and "squash_mask()" in said[0]
    assert {e.name for e in sparsify.core.state.find_state(m).plan.rewritten} == {"2"}
    sp.squash_mask()
    m = sparsify.sparsify(model, "st3", total_steps=3, example_inputs=(x,))
    assert {e.name for e in sparsify.core.state.find_state(m).plan.rewritten} == {"0", "2"}
