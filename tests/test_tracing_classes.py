"""A traced submodule keeps its original class: methods other than forward, plain attributes,
isinstance, indexing (Sequential), through copy.deepcopy, pickling and a retrace."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparsify
from passes import trace
from passes.tracing import TracedModule


class Head(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = scale  # a plain attribute, used outside forward
        self.unused = nn.Linear(2, 2)  # called only by `loss`, never by forward

    def forward(self, x):
        return self.conv(x).relu()

    def loss(self, y):
        return y.mean() * self.scale + self.unused.weight.sum() * 0


class Detector(nn.Module):
    """Loops over a list: the root does not trace; its head does, and the root calls head.loss."""

    def __init__(self):
        super().__init__()
        self.head = Head(2.0)
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())

    def forward(self, images):
        outs = [self.head(self.body(x[None])) for x in images]
        return sum(self.head.loss(o) for o in outs)


def _traced():
    torch.manual_seed(0)
    model = Detector()
    return model, trace(model).module


def test_traced_child_keeps_methods_attributes_and_class():
    model, traced = _traced()
    head = traced.head
    assert isinstance(head, torch.fx.GraphModule) and isinstance(head, TracedModule)
    assert isinstance(head, Head) and type(head).__name__ == "Head"
    assert head.scale == 2.0 and "unused" in dict(head.named_children())
    assert isinstance(traced.body[0], nn.Conv2d) and len(traced.body) == 2  # Sequential indexing survives
    images = [torch.randn(3, 8, 8), torch.randn(3, 8, 8)]
    torch.testing.assert_close(traced(images), model(images))


def test_traced_child_survives_deepcopy_pickle_and_retrace():
    model, traced = _traced()
    images = [torch.randn(3, 8, 8)]
    expected = model(images)
    copied = copy.deepcopy(traced)
    assert type(copied.head).__name__ == "Head" and isinstance(copied.head, Head) and copied.head.scale == 2.0
    assert copied.head.conv.weight is not traced.head.conv.weight
    torch.testing.assert_close(copied(images), expected)
    buf = io.BytesIO()
    torch.save(traced, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.head, Head) and loaded.head.scale == 2.0 and len(loaded.body) == 2
    torch.testing.assert_close(loaded(images), expected)
    unpickled = pickle.loads(pickle.dumps(traced.head))
    assert isinstance(unpickled, Head) and callable(unpickled.loss) and "unused" in dict(unpickled.named_children())
    retraced = trace(traced.head).module
    assert isinstance(retraced, Head) and retraced.scale == 2.0


def _small_retinanet():
    # RetinaNet's own head and loss on a resnet18 + 64-channel FPN: retinanet_resnet50_fpn and
    # fcos_resnet50_fpn were checked with the zoo sweep (benchmarks/zoo.py); this keeps the test fast
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    torch.manual_seed(0)
    backbone = BackboneWithFPN(torchvision.models.resnet18(), {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [128, 256, 512], 64, extra_blocks=LastLevelP6P7(64, 64))
    return RetinaNet(backbone, num_classes=3, min_size=64, max_size=64)


def test_retinanet_trains_with_its_head_traced_under_the_fallback():
    """RetinaNet's root does not trace; its head does, and the root calls head.compute_loss
    (before: AttributeError 'RetinaNetHead' object has no attribute 'compute_loss')."""
    model = _small_retinanet()
    image = torch.randn(3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "st3", total_steps=10, example_inputs=([image],))
    assert isinstance(m.head, torch.fx.GraphModule) and isinstance(m.head, type(model.head))
    rewritten = {e.name for e in sparsify.core.state.find_state(m).plan.rewritten}
    assert any(n.startswith("head.classification_head.") for n in rewritten)
    net = copy.deepcopy(m)  # the copy keeps the head's methods too
    opt = torch.optim.SGD(sparsify.param_groups(net, 1e-4), lr=1e-3)
    net.train()
    losses = net([image], [{"boxes": torch.tensor([[4.0, 4.0, 32.0, 32.0]]), "labels": torch.tensor([1])}])
    assert set(losses) == {"classification", "bbox_regression"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    assert net.head.classification_head.conv[0][0].weight.grad is not None
    opt.step()
    sparsify.step(net)


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.ReLU())

    def forward(self, xs):  # iterates over its input: untraceable, its `conv` is traced on its own
        return [self.conv(x) for x in xs]


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.classif, self.reg = _Branch(), _Branch()

    def forward(self, xs):
        return self.classif(xs) + self.reg(xs)


def test_finalize_removes_each_regularizer_from_its_own_graph():
    """Graphs at h.classif.conv and h.reg.conv: removing h.reg.conv.1_tl1 once looked in
    h.classif.conv for the cut-off name "1" and erased that graph's ReLU instead."""
    model = nn.Sequential()
    model.add_module("h", _TwoBranches())
    xs = [torch.randn(2, 3, 8, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "tl1", total_steps=4, example_inputs=(xs,))
    assert sparsify.core.state.find_state(m).graph_paths[1:] == ["h.classif.conv", "h.reg.conv"]
    final = sparsify.finalize(m, (xs,))
    kinds = [type(x).__name__ for x in final.modules()]
    assert kinds.count("ReLU") == 4 and not any(type(x).__module__.startswith("sparsify") for x in final.modules())


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, ids, types=None, scale=False):
        x = self.proj(ids)
        if types is None:  # decided at trace time: right only if traced as the parent calls it
            types = torch.zeros_like(x)
        if scale:  # a flag: untraceable unless specialised
            x = 2 * x
        return x + types


class _CallsWithNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _Embed()

    def forward(self, xs):
        return [self.embed(x, None, scale=True) for x in xs]  # iterates: the root does not trace


def test_children_under_a_fallback_are_specialised_to_how_the_parent_calls_them():
    from passes.tracing import CallRecord
    torch.manual_seed(0)
    model = _CallsWithNone()
    xs = [torch.randn(2, 4)]
    expected = model(xs)
    assert CallRecord(model, (xs,)).concrete_args("embed", model.embed) == {"types": None, "scale": True}
    r = trace(copy.deepcopy(model))  # unspecialised: `scale` is a proxy, `embed` a leaf
    assert "embed" not in r.graphs and "embed" in {f.name for f in r.fallbacks}
    work = copy.deepcopy(model)
    r = trace(work, calls=CallRecord(work, (xs,)))
    assert "embed" in r.graphs and isinstance(r.module.embed, _Embed)
    torch.testing.assert_close(r.module(xs), expected)
    # a call the graph was not specialised to runs the module's own forward (its CallGuard)
    types = torch.ones(2, 4)
    torch.testing.assert_close(r.module.embed(xs[0], types, scale=False), model.embed(xs[0], types, scale=False))
    torch.testing.assert_close(r.module.embed(xs[0], types, scale=True), model.embed(xs[0], types, scale=True))
