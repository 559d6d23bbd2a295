"""Training in eval mode (docs/index.md#the-training-loop-contract): a penalty recipe records its
terms in training-mode forwards only, so a loop that left ``model.eval()`` on (after a validation
pass) trained without the penalty and learned no sparsity, and nothing said so. Now the first
``sparsify.step`` that followed only eval-mode forwards with gradients warns, once; a validation
pass with gradients between training steps stays quiet."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

import sparsify

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
PENALTY_RECIPES = ["activation-hoyer", "activation-l1", "dual", "tl1"]
SAID = "trained in eval mode"


def run(recipe, modes) -> tuple[list[str], float]:
    torch.manual_seed(0)
    # dual trains dense for its first 30% of steps: 4 steps reach its penalty stages
    extra = {"total_steps": 4} if recipe == "dual" else {"total_steps": 20, "begin": 0}
    model = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), recipe, example_inputs=X, **extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    total = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in modes:
            model.train(mode == "train")
            loss = F.cross_entropy(model(X), Y)
            penalty = sparsify.penalty(model)
            total += float(penalty)
            (loss + penalty).backward()
            opt.step()
            opt.zero_grad()
            sparsify.step(model)
            model.eval()
            F.cross_entropy(model(X), Y)  # a validation pass with gradients on, between the steps
    return [str(w.message) for w in caught if SAID in str(w.message)], total


@pytest.mark.parametrize("recipe", PENALTY_RECIPES)
def test_a_loop_left_in_eval_mode_is_told_once(recipe):
    said, total = run(recipe, ["eval"] * 4)
    assert total == 0.0  # what it warns about: no penalty reached the loss
    assert len(said) == 1 and "model.train()" in said[0], said


@pytest.mark.parametrize("recipe", PENALTY_RECIPES)
def test_validation_with_gradients_between_training_steps_is_quiet(recipe):
    said, total = run(recipe, ["train"] * 4)
    assert total > 0.0 and said == []
