"""Taking features from a sparse model (docs/hooks.md): torchvision's
``create_feature_extractor`` traces the model again with torch.fx. Applied to a sparsified model it
failed deep inside a sparse layer ("symbolically traced variables cannot be used as inputs to
control flow"); now it is a one-line error naming the two orders that work, which these tests run."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import sparsify

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NODES = {"layer2": "f2", "layer4": "f4"}


def sparse_resnet(recipe="gmp"):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(torchvision.models.resnet18(num_classes=10), recipe, example_inputs=(X,),
                                 total_steps=10)


@pytest.mark.parametrize("trace", [lambda m: create_feature_extractor(m, NODES), torch.fx.symbolic_trace])
@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_tracing_a_sparsified_model_again_is_a_one_line_error(trace, recipe):
    # every recipe: weight layers, and the nodes activation recipes insert (an extractor of a tl1
    # model traced without error, and its forwards recorded no penalty: record() is no graph op)
    with pytest.raises(RuntimeError, match=r"cannot be traced again by torch.fx .* sparsify.finalize\(model\)"):
        trace(sparse_resnet(recipe))


@pytest.mark.parametrize("recipe", ["gmp", "st3-sigma", "sas"])
def test_the_extractor_of_the_dense_model_sparsifies_trains_and_finalizes(recipe):
    torch.manual_seed(0)
    extractor = create_feature_extractor(torchvision.models.resnet18(num_classes=10), NODES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(extractor, recipe, example_inputs=(X,), total_steps=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(4):
            out = model(X)
            loss = out["f2"].mean() + out["f4"].square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(model)
        final = sparsify.finalize(model)
    assert {k: tuple(v.shape) for k, v in final(X).items()} == {"f2": (2, 128, 4, 4), "f4": (2, 512, 1, 1)}
    rep = sparsify.report(model)
    assert len(rep.layers) >= 19 and rep.step == 4, (len(rep.layers), rep.step)  # the extractor's layers are the sparse ones
    assert min(rep.totals["achieved"].values()) >= 0.5  # weights 0.9 (gmp, st3-sigma), SAS's input slots 0.5


def test_the_extractor_of_the_finalized_model_reads_its_features():
    model = sparse_resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(model)
    feats = create_feature_extractor(final, NODES)(X)
    assert torch.equal(feats["f4"], final.layer4(final.layer3(final.layer2(final.layer1(
        final.maxpool(final.relu(final.bn1(final.conv1(X)))))))))
