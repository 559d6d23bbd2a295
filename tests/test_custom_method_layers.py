"""A method written outside the library whose layers compute an effective weight
(docs/writing-a-method.md): mistakes in that weight are named by ``sparsify()``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify
from sparsify.core.contract import Method
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.registry import REGISTRY, register


class Transposed(SparseWeightMixin, nn.Linear):
    def effective_weight(self):
        return self.weight.t()


class Widened(SparseWeightMixin, nn.Linear):
    def effective_weight(self):
        return self.weight.double()


class Halved(SparseWeightMixin, nn.Linear):
    def effective_weight(self):
        return self.weight * 0.5


def _method(name, layer_class):
    class Mine(Method):
        def apply(self, site, params):
            site.replace(layer_class.from_dense(site.module))
    Mine.name = name
    return Mine


@pytest.mark.parametrize("layer_class, why", [(Transposed, r"shape \(8, 16\) for a weight of shape \(16, 8\)"),
                                              (Widened, "dtype torch.float64 for a weight of dtype torch.float32")])
def test_an_effective_weight_that_does_not_fit_its_layer_is_named_by_sparsify(layer_class, why):
    register(_method("t-eff", layer_class))
    try:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        recipe = {"version": 1, "rules": [{"match": {"name": "0"}, "method": "t-eff"}]}
        with pytest.raises(ValueError, match=rf"^sparsify: {layer_class.__name__}\.effective_weight\(\) of 0 "
                                             rf"\(method 't-eff'\) returned {why}; it must return"):
            sparsify.sparsify(model, recipe, example_inputs=torch.randn(2, 8))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert type(model[0]) is nn.Linear  # the caller's model is left as it was
    finally:
        REGISTRY.pop("t-eff", None)


def test_an_effective_weight_that_fits_is_used_by_the_forward():
    register(_method("t-half", Halved))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16))
        x = torch.randn(2, 8)
        expected = nn.functional.linear(x, model[0].weight * 0.5, model[0].bias)
        sparse = sparsify.sparsify(model, {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "t-half"}]},
                                   example_inputs=x, copy=True)
        torch.testing.assert_close(sparse(x), expected)
    finally:
        REGISTRY.pop("t-half", None)
