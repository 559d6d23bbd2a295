"""Meta-device initialisation, the way large models are built for FSDP2: the model is made on
``meta``, sparsified there (shapes only), given memory with ``to_empty`` and then a checkpoint.
``to_empty`` gives the sparsity state (masks, thresholds, step counter) memory without values:
until a sparsified checkpoint fills it, every use is refused with the way out, never run on
whatever that memory held. Methods that read weight values when they are set up say so at
``sparsify`` time."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import sparsify
from loops import run_steps

RECIPES = sorted(sparsify.builtin_recipes())
# their step-0 update reads the weights (ST-3's thresholds, N:M's masks)
NEEDS_VALUES = {"st3", "st3-sigma", "nm-2-4"}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1])


def on_meta(recipe: str):
    with torch.device("meta"):
        net = torchvision.models.resnet18(num_classes=10)
    return sparsify.sparsify(net, recipe, total_steps=10, example_inputs=(torch.zeros(1, 3, 32, 32, device="meta"),))


def trained(recipe: str):
    torch.manual_seed(0)
    model = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), recipe, total_steps=10,
                              example_inputs=(X[:1],))
    run_steps(model, torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01), [(X, Y)] * 3, penalty=True)
    return model


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_materialized_model_without_its_state_is_refused(recipe):
    if recipe in NEEDS_VALUES:
        with pytest.raises(RuntimeError, match="reads the weights' values.*after materializing"):
            on_meta(recipe)
        return
    model = on_meta(recipe).to_empty(device="cpu")
    for use in (lambda: model(X), lambda: sparsify.step(model), lambda: sparsify.report(model),
                lambda: sparsify.finalize(model)):
        with pytest.raises(RuntimeError, match="sparsified on the meta device.*load the state_dict"):
            use()
    # dense weights alone (strict=False) leave the sparsity state empty: still refused
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    dense = {k: v for k, v in torchvision.models.resnet18(num_classes=10).state_dict().items()
             if shapes.get(k) == v.shape}  # (SAS's widened layers take no dense weight)
    model.load_state_dict(dense, strict=False)
    with pytest.raises(RuntimeError, match="sparsified on the meta device"):
        model(X)


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - NEEDS_VALUES))
def test_a_sparsified_checkpoint_fills_the_materialized_model(recipe):
    source = trained(recipe)
    model = on_meta(recipe).to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    source.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), source(X))
    assert sparsify.report(model).totals == sparsify.report(source).totals
    with torch.no_grad():  # the example inputs given on meta are shapes only: finalize checks on drawn ones
        final = sparsify.finalize(model)
        assert torch.equal(final(X), sparsify.finalize(source)(X))
    assert not final._forward_pre_hooks  # sparsify's refusal of an unfilled model is not deployed
    model.train()
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01)
    loss = F.cross_entropy(model(X), Y) + sparsify.penalty(model)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert sparsify.step(model, loss) == 4
