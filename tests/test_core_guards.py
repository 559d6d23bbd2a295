"""Core edges a one-line change would silently alter: the min-density floor of the global
threshold (a one-weight layer and a tie at a capped layer's own threshold) and the mode of the
modules a rewrite inserts into a model sparsified in eval mode."""
from __future__ import annotations

import torch
from torch import nn

import sparsify
from sparsify.core.keep import guarded_thresholds
from sparsify.methods.regularizers import ActivationRegularizer


def pruned(values, taus):
    return [int((v <= t).sum()) for v, t in zip(values, taus)]


def test_a_one_weight_layer_keeps_its_weight_under_the_floor():
    """min_density keeps ceil(0.01 * 1) = 1 weight of a one-weight layer whose weight lies under
    the global threshold (docs/methods/magnitude.md, min_density)."""
    one, big = torch.tensor([0.001]), torch.arange(1.0, 101.0)
    taus, _ = guarded_thresholds([one, big], 0.5, 0.01)
    assert pruned([one, big], taus)[0] == 0


def test_a_tie_at_a_capped_layers_threshold_does_not_prune_below_its_floor():
    """A layer held at min_density 0.5 of its 10 weights prunes at most 5, even when its 5th and
    6th smallest magnitudes are equal."""
    tied = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.06, 0.07, 0.08, 0.09])
    big = torch.arange(1.0, 101.0)
    taus, _ = guarded_thresholds([tied, big], 0.5, 0.5)
    assert pruned([tied, big], taus)[0] <= 5


def test_modules_inserted_into_an_eval_model_are_in_eval_mode():
    """A model sparsified in eval mode gets its tl1 nodes in eval mode too: an evaluation forward
    records no penalty (the eval-mode forward of docs/methods/tl1.md)."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    m = sparsify.sparsify(net, "tl1", example_inputs=torch.zeros(1, 8))
    inserted = [mod for mod in m.modules() if isinstance(mod, ActivationRegularizer)]
    assert inserted and not any(mod.training for mod in inserted)
    m(torch.randn(2, 8))
    assert float(sparsify.penalty(m)) == 0.0
