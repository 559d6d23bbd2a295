"""Semi-structured masks of a conv that one head runs on every feature level (torchvision's RPN /
RetinaNet / FCOS heads): no single position mask fits, the layer stays unmasked, said once."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.methods.semistructured import PositionMask

SAID = "called at several output sizes"
X = torch.randn(2, 3, 16, 16)


class Head(nn.Module):  # like RPNHead: one block for every level
    def __init__(self, levels_in_eval: int = 2):
        super().__init__()
        self.levels_in_eval = levels_in_eval
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, feats):
        return [self.conv(f) for f in (feats if self.training else feats[:self.levels_in_eval])]


class Net(nn.Module):
    def __init__(self, levels_in_eval: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))  # traceable: masked
        self.head = Head(levels_in_eval)

    def forward(self, x):
        f1 = self.stem(x)
        if float(x.abs().max()) > 1e9:  # data-dependent, like a detector root: untraceable
            return []
        return self.head([f1, F.max_pool2d(f1, 2)])


def net(levels_in_eval: int = 2) -> Net:
    torch.manual_seed(0)
    return Net(levels_in_eval)


def masks(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PositionMask)}


def train(model, steps: int, opt=None) -> list[float]:
    opt = opt or torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01)
    losses = []
    for _ in range(steps):
        loss = sum(o.pow(2).mean() for o in model(X))
        opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(model, loss)
        losses.append(float(loss))
    return losses


def said(caught) -> list[str]:
    return [str(w.message) for w in caught if SAID in str(w.message)]


@pytest.mark.parametrize("levels_in_eval, when", [(2, "sparsify"), (1, "step")])
def test_shared_head_stays_unmasked_said_once_report_honest_finalize_equal(levels_in_eval, when):
    """levels_in_eval=2: sparsify()'s forward on the example input sees both sizes; 1: only the
    training forwards do (the first step that sees it says it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sparsify.sparsify(net(levels_in_eval), "semi-structured", total_steps=6, example_inputs=X)
        at_build = said(caught)
        train(model, 6)
    assert len(at_build) == (1 if when == "sparsify" else 0)
    assert said(caught) == ["sparsify: semi-structured: head.conv.0 is called at several output sizes "
                            "((16, 16), (8, 8)) per forward (a head shared across feature levels): no single "
                            "position mask fits, left unmasked"]
    pm = masks(model)
    assert bool((pm["head.conv.0_pmask"].mask == 1).all()) and not pm["head.conv.0_pmask"].enabled
    assert int((pm["stem.0_pmask"].mask == 0).sum()) == round(0.2 * 16 * 16)

    rep = sparsify.report(model).to_dict()
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["head.conv.0_pmask"]["achieved"] == 0.0
    # the head's positions at both sizes are kept, and count: 51 dropped of 256 + 256 + 64
    assert rep["totals"]["achieved"]["output positions"] == pytest.approx(51 / (256 + 256 + 64))
    described = next(iter(rep["groups"].values()))
    assert described["masks"] == 1 and described["unmasked_shared"] == ["head.conv.0_pmask"]

    model.eval()
    final = sparsify.finalize(model)
    assert not any(isinstance(m, PositionMask) for n, m in final.named_modules() if n.startswith("head"))
    with torch.no_grad():
        for got, want in zip(final(X), model(X)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("levels_in_eval", [2, 1])
def test_state_dict_round_trip_continues_identically(levels_in_eval):
    dense = net(levels_in_eval)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = sparsify.sparsify(copy.deepcopy(dense), "semi-structured", total_steps=8, example_inputs=X)
        train(a, 3)  # into the ramp: the stem's mask has zeros, the head is known shared
        b = sparsify.sparsify(copy.deepcopy(dense), "semi-structured", total_steps=8, example_inputs=X)
        b.load_state_dict(a.state_dict())
        assert not masks(b)["head.conv.0_pmask"].enabled
        assert train(b, 5) == train(a, 5)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert bool((masks(b)["head.conv.0_pmask"].mask == 1).all())


def test_one_resolution_per_forward_is_not_taken_for_a_shared_head():
    """A model evaluated at another resolution in the dense phase: every conv changes size in turn,
    none is shared; once masks are on, another resolution is still refused."""
    model = sparsify.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                                            nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)),
                              "semi-structured", total_steps=20, example_inputs=X)  # masks from step 3
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(10):
            loss = model(X).square().mean()
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(model, loss)
            if step < 2:  # masks off: another resolution runs
                with torch.no_grad():
                    for _ in range(2):
                        model(torch.randn(1, 3, 24, 24))
    assert said(caught) == []
    assert all(pm.enabled for pm in masks(model).values())
    with pytest.raises(RuntimeError, match="resolution its masks were made for"):
        model(torch.randn(1, 3, 24, 24))


def test_fasterrcnn_fpn_trains_with_its_rpn_head_unmasked():
    """fasterrcnn_mobilenet_v3_large_fpn at 128x128 crashed at step 4 in rpn.head.conv: one conv
    block for every pyramid level, behind an untraceable parent, had one mask."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
        images = [torch.rand(3, 128, 128) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
                   {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([2])}]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = sparsify.sparsify(model, "semi-structured", total_steps=5, example_inputs=(images,))
            opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.001)
            m.train()
            for _ in range(5):
                loss = sum(m(images, targets).values())
                opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m, loss=loss.detach())
    finally:
        torch.set_num_threads(threads)
    messages = said(caught)
    assert len(messages) == 1 and "rpn.head.conv.0.0 is called" in messages[0], messages
    pm = masks(m)
    # (rpn.head.conv.0 is a Conv2dNormActivation, a Sequential: the mask sits beside it, named for the path)
    assert not pm["rpn.head.conv.0_0_pmask"].enabled and pm["rpn.head.conv.0_0_pmask"].layer == "rpn.head.conv.0.0"
    assert any(p.enabled for n, p in pm.items() if n.startswith("backbone.body"))


@pytest.mark.parametrize("fixed_size, total_steps, refused_by", [(None, 10, "step"), (None, 3, "forward"),
                                                                 ((160, 128), 3, None)])
def test_a_detector_that_sizes_its_batches_itself_is_warned_and_trains_with_fixed_size(fixed_size, total_steps,
                                                                                       refused_by):
    """GeneralizedRCNNTransform resizes each image to its own aspect ratio and pads the batch: a
    batch of other images reached the backbone at another size, and the masks, made for the size of
    the latest training batch, crashed the next one with a hint (example_inputs at the training
    resolution) that cannot be followed. Now sparsify() warns, the step refuses the other size,
    and fixed_size=(W, H) gives every batch one size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=256, fixed_size=fixed_size)
        target = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([1])}]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = sparsify.sparsify(model, "semi-structured", total_steps=total_steps,
                                  example_inputs=([torch.rand(3, 120, 150)],))
        warned = [str(w.message) for w in caught if "GeneralizedRCNNTransform" in str(w.message)]
        assert len(warned) == (1 if fixed_size is None else 0)
        m.train()
        opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.001)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for shape in [(3, 120, 150), (3, 200, 100), (3, 64, 250)]:
                if refused_by == "forward" and shape != (3, 120, 150):
                    said = (r"^PositionMask: the mask is \(64, 80\) but backbone\.body\.0\.0's output is "
                            r"\(128, 64\).*fixed_size=\(W, H\)")
                    with pytest.raises(RuntimeError, match=said):
                        m([torch.rand(*shape)], target)
                    return
                loss = sum(m([torch.rand(*shape)], target).values())
                opt.zero_grad(); loss.backward(); opt.step()
                if refused_by == "step" and shape != (3, 120, 150):
                    said = (r"^semi-structured: a training forward ran backbone\.body\.0\.0 at output size 128x64, "
                            r"but its position mask is made for 64x80.* fixed_size=\(W, H\)")
                    with pytest.raises(RuntimeError, match=said):
                        sparsify.step(m, loss.detach())
                    return
                sparsify.step(m, loss.detach())
    finally:
        torch.set_num_threads(threads)
    assert any(p.enabled for n, p in masks(m).items() if n.startswith("backbone.body"))
