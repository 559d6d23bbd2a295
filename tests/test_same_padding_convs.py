"""Conv subclasses that pad TF-"same" style and then convolve with ``self.weight`` as it is, written
as lukemelas' efficientnet_pytorch writes them (a ZeroPad2d child made from the image size, or
padding computed per call). Every weight method rewrote none of EfficientNet's 81 such convs
(they compute with their own forward); now the sparse layer runs that forward with its effective
weight, and finalize gives back the same class with its padding child (sparsify/core/subclasses.py).
Also its MemoryEfficientSwish, an activation tl1 and the activation recipes now reach."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


class Conv2dStaticSamePadding(nn.Conv2d):
    def __init__(self, cin, cout, k, stride=1, image_size=8, **kwargs):
        super().__init__(cin, cout, k, stride, **kwargs)
        oh = math.ceil(image_size / self.stride[0])
        pad = max((oh - 1) * self.stride[0] + (k - 1) + 1 - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else nn.Identity()

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dDynamicSamePadding(nn.Conv2d):
    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SwishImplementation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i):
        ctx.save_for_backward(i)
        return i * torch.sigmoid(i)

    @staticmethod
    def backward(ctx, grad):
        (i,) = ctx.saved_tensors
        s = torch.sigmoid(i)
        return grad * (s * (1 + i * (1 - s)))


class MemoryEfficientSwish(nn.Module):
    def forward(self, x):
        return SwishImplementation.apply(x)


for _cls in (Conv2dStaticSamePadding, Conv2dDynamicSamePadding, MemoryEfficientSwish):
    _cls.__module__ = "efficientnet_pytorch.utils"  # the classes sparsify knows by qualified name


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=8, bias=False)
        self.act = MemoryEfficientSwish()
        self.conv = Conv2dDynamicSamePadding(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(self.act(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("recipe", ["st3", "gmp", "str", "nm-2-4", "dual"])
def test_same_padding_convs_are_rewritten_and_finalize_to_their_class(recipe):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    dense = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(dense, recipe, total_steps=2, example_inputs=(x,))
    plan = sparsify.core.state.find_state(m).plan
    # (nm-2-4 leaves a first layer of 3 input channels dense, by its own rule)
    assert ({"conv"} if recipe == "nm-2-4" else {"stem", "conv"}) <= {e.name for e in plan.rewritten}
    loss = F.cross_entropy(m(x), torch.tensor([0, 1])) + sparsify.penalty(m)
    loss.backward()
    sparsify.step(m)
    final = sparsify.finalize(m)  # its output check passes: the padding is kept
    assert type(final.stem) is Conv2dStaticSamePadding and isinstance(final.stem.static_padding, nn.ZeroPad2d)
    assert type(final.conv) is Conv2dDynamicSamePadding
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(final(x), m(x))
    assert final.state_dict().keys() == dense.state_dict().keys()


def test_memory_efficient_swish_is_an_activation_the_activation_recipes_reach():
    x = torch.randn(2, 3, 8, 8)
    plan = sparsify.plan(Net(), "tl1", example_inputs=(x,))
    assert [(e.name, e.kind) for e in plan.rewritten] == [("act", "MemoryEfficientSwish")]


def test_sas_leaves_them_dense_and_says_the_weight_methods_rewrite_them():
    # SAS widens the layer and computes its own way: the message said "it may transform the weight, as
    # weight standardisation does" (FalconLinear under SAS too), contradicting the weight recipes rewriting it
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(Net(), "sas", total_steps=4, example_inputs=torch.randn(2, 3, 8, 8))
    said = [str(w.message) for w in caught if "left dense (first:" in str(w.message)]
    assert said and "the weight methods rewrite it" in said[0] and "standardisation" not in said[0]
