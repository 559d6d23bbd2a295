"""A BatchNorm the user froze (``bn.eval()`` inside a training model, the usual fine-tuning
setup) stays frozen through everything sparsify does: ``model.train(was_training)`` after an
eval forward set the whole tree back to training, and its running statistics moved again."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sparsify


def _frozen_bn_resnet() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _bn_modes(model: nn.Module) -> set[bool]:
    return {m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)}


X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("recipe", ["st3", "semi-structured", "sas", "activation-l1", "dual"])
def test_sparsify_keeps_frozen_batchnorm_frozen(recipe):
    for capture in ("fx", "export"):
        model = sparsify.sparsify(_frozen_bn_resnet(), recipe, total_steps=10, example_inputs=(X,),
                                  capture=capture)
        assert model.training and _bn_modes(model) == {False}, (recipe, capture)


def test_measure_report_step_and_finalize_keep_modes():
    torch.manual_seed(0)
    model = sparsify.sparsify(_frozen_bn_resnet(), "st3", total_steps=10, example_inputs=(X,))
    assert _bn_modes(model) == {False}
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sparsify.measure(model, [X])
    assert model.training and _bn_modes(model) == {False}
    sparsify.report(model)
    sparsify.step(model)
    assert model.training and _bn_modes(model) == {False}
    sparsify.finalize(model, X)
    assert model.training and _bn_modes(model) == {False}
    model(X)  # a training forward: the frozen statistics stay as they were
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))
