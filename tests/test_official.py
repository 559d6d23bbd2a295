"""Official checkpoint layouts (ST-3: vanderschuea/stthree; STR: RAIVNLab/STR) load into the
sparsified model and give the official outputs; what we save loads into the official layers.

The official layers below are written from docs/methods/st3.md and docs/methods/str.md in plain torch (forward and the
gradients their autograd gives), with the official parameter names and shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.deploy.official import load_official_state_dict, to_official_state_dict


class OfficialST3Layer(nn.Module):
    """stthree ``STEPrunedConv2d``/``STEPrunedLinear`` with soft=True, rescale=True."""

    def __init__(self, weight, kind, **conv):
        super().__init__()
        self.kind, self.conv = kind, conv
        self.weight = nn.Parameter(weight.clone())
        self.th = nn.Parameter(torch.tensor([-1.0]), requires_grad=False)
        self.fixed = nn.Parameter(torch.tensor([False]), requires_grad=False)
        self.scale = nn.Parameter(torch.ones((weight.shape[0],) + (1,) * (weight.dim() - 1)), requires_grad=False)
        self.mask = nn.Parameter(torch.ones_like(weight), requires_grad=False)

    def get_weights(self):
        w = self.weight
        if self.fixed:
            return w * self.mask
        if self.th > 0:
            with torch.no_grad():
                q = self.scale * (w - torch.sign(w) * self.th) * self.mask
            return w + (q - w).detach()
        return w

    def forward(self, x):
        w = self.get_weights()
        return F.conv2d(x, w, None, **self.conv) if self.kind == "conv" else F.linear(x, w)


class OfficialSTRLayer(nn.Module):
    """STR ``STRConv`` (a Linear classifier here: the same formula)."""

    def __init__(self, weight, kind, bias=None, **conv):
        super().__init__()
        self.kind, self.conv = kind, conv
        self.weight = nn.Parameter(weight.clone())
        self.sparseThreshold = nn.Parameter(torch.full([1, 1], -10.0))

    def forward(self, x):
        w = torch.sign(self.weight) * torch.relu(self.weight.abs() - torch.sigmoid(self.sparseThreshold))
        return F.conv2d(x, w, None, **self.conv) if self.kind == "conv" else F.linear(x, w)


class Net(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=bias)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, bias=bias)
        self.fc = nn.Linear(16 * 3 * 3, 10, bias=bias)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def official_net(layer_cls, ours: Net) -> Net:
    net = Net(bias=False)
    net.conv1 = layer_cls(ours.conv1.weight.detach(), "conv")
    net.conv2 = layer_cls(ours.conv2.weight.detach(), "conv", stride=2)
    net.fc = layer_cls(ours.fc.weight.detach(), "linear")
    return net


def x_batch():
    return torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(3))


def assert_same_outputs_and_grads(ours, official):
    x = x_batch()
    y_ours, y_off = ours(x), official(x)
    torch.testing.assert_close(y_ours, y_off, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_off)
    (y_ours * g).sum().backward()
    (y_off * g).sum().backward()
    for name in ("conv1", "conv2", "fc"):
        torch.testing.assert_close(getattr(ours, name).weight.grad, getattr(official, name).weight.grad,
                                   rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# ST-3
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("states", [("soft", "fixed", "dense"), ("fixed", "dense", "soft"), ("soft",) * 3])
def test_st3_official_checkpoint_gives_official_outputs(states):
    torch.manual_seed(0)
    official = official_net(OfficialST3Layer, Net())
    with torch.no_grad():
        for name, state in zip(("conv1", "conv2", "fc"), states):
            lay = getattr(official, name)
            w = lay.weight
            th = float(w.abs().flatten().kthvalue(int(0.6 * w.numel())).values)
            if state == "dense":
                continue  # th = -1: the plain layer
            lay.th.fill_(th)
            lay.mask.copy_((w.abs() > th).float())
            dims = tuple(range(1, w.dim()))
            rho = ((w.abs() * lay.mask).mean(dims, keepdim=True) + 1e-6) / (w.abs().mean(dims, keepdim=True) + 1e-6)
            lay.scale.copy_(1.01 / (rho + 0.01))
            if state == "fixed":
                w.copy_(lay.get_weights())
                lay.fixed.fill_(True)
            # the stored state is what counts, not |W| > th: let the weights move after it was set
            w.add_(0.01 * torch.randn_like(w))
    sd = official.state_dict()
    assert set(sd) == {f"{n}.{k}" for n in ("conv1", "conv2", "fc") for k in ("weight", "th", "fixed", "scale", "mask")}
    assert sd["conv1.scale"].shape == (8, 1, 1, 1) and sd["conv1.th"].shape == (1,) and sd["conv1.mask"].dtype == torch.float32

    ours = sparsify.sparsify(Net(), "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=x_batch())
    load_official_state_dict(ours, sd)
    for name in ("conv1", "conv2", "fc"):
        assert float(getattr(ours, name).bias.detach().abs().sum()) == 0.0, "official layers have no bias"
    assert_same_outputs_and_grads(ours, official)
    # and back: the official layout of what we loaded is the checkpoint
    back = to_official_state_dict(ours)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fix", [None, 3])
def test_st3_saved_official_layout_loads_into_the_official_layers(fix):
    torch.manual_seed(1)
    ours = sparsify.sparsify(Net(bias=False), "st3-sigma", sparsity=0.7, begin=0, end=2, fix=fix,
                             example_inputs=x_batch())
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        F.cross_entropy(ours(x_batch()), torch.arange(4)).backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(ours)
    assert bool(ours.conv1.fixed) == (fix is not None)
    official = official_net(OfficialST3Layer, ours)
    official.load_state_dict(to_official_state_dict(ours), strict=True)
    assert_same_outputs_and_grads(ours, official)


def test_st3_nonzero_bias_is_kept_with_a_warning():
    ours = sparsify.sparsify(Net(), "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=x_batch())
    with pytest.warns(UserWarning, match="non-zero bias"):
        sd = to_official_state_dict(ours)
    assert "fc.bias" in sd and not any("sparsify_state" in k for k in sd)


def test_loading_a_fixed_checkpoint_stays_fixed():
    ours = sparsify.sparsify(Net(bias=False), "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=x_batch())
    sd = to_official_state_dict(ours)
    for name in ("conv1", "conv2", "fc"):
        sd[f"{name}.weight"] = sd[f"{name}.weight"] * sd[f"{name}.mask"]
        sd[f"{name}.fixed"] = torch.tensor([True])
    load_official_state_dict(ours, sd)
    masks = [m.mask.clone() for m in (ours.conv1, ours.conv2, ours.fc)]
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    F.cross_entropy(ours(x_batch()), torch.arange(4)).backward()
    opt.step()
    sparsify.step(ours)  # the group does not re-threshold frozen layers
    for m, mask in zip((ours.conv1, ours.conv2, ours.fc), masks):
        assert torch.equal(m.mask, mask)
        assert bool((m.weight.detach()[~mask] == 0).all())


def test_strict_loading_names_the_keys():
    ours = sparsify.sparsify(Net(bias=False), "st3", sparsity=0.5, begin=0, end=0, fix=None, example_inputs=x_batch())
    sd = to_official_state_dict(ours)
    sd["conv3.weight"] = torch.zeros(1)
    del sd["fc.th"]
    with pytest.raises(ValueError, match=r"does not have: conv3\.weight.*lacks: fc\.tau"):
        load_official_state_dict(ours, sd)


# ---------------------------------------------------------------------------------------------
# STR
# ---------------------------------------------------------------------------------------------

def test_str_official_checkpoint_gives_official_outputs():
    torch.manual_seed(0)
    official = official_net(OfficialSTRLayer, Net())
    with torch.no_grad():
        for i, name in enumerate(("conv1", "conv2", "fc")):
            getattr(official, name).sparseThreshold.fill_(-2.0 - i)  # sigmoid: 0.12, 0.05, 0.02
    sd = official.state_dict()
    assert sd["conv1.sparseThreshold"].shape == (1, 1)
    # the official classifier is a 1x1 conv: its (out, in, 1, 1) weight loads into our Linear
    sd["fc.weight"] = sd["fc.weight"][:, :, None, None]
    ours = sparsify.sparsify(Net(), "str", example_inputs=x_batch())
    load_official_state_dict(ours, sd)
    assert float(ours.conv1.s) == -2.0 and ours.conv1.s.shape == (1,)
    assert_same_outputs_and_grads(ours, official)
    for name in ("conv1", "conv2", "fc"):
        torch.testing.assert_close(getattr(ours, name).s.grad.reshape(1, 1),
                                   getattr(official, name).sparseThreshold.grad, rtol=1e-5, atol=1e-7)


def test_str_saved_official_layout_loads_into_the_official_layers():
    ours = sparsify.sparsify(Net(bias=False), "str", s_init=-3.0, example_inputs=x_batch())
    official = official_net(OfficialSTRLayer, ours)
    sd = to_official_state_dict(ours)
    assert sd["conv2.sparseThreshold"].shape == (1, 1)
    official.load_state_dict(sd, strict=True)
    assert_same_outputs_and_grads(ours, official)


def test_str_global_threshold_loads_only_when_shared():
    ours = sparsify.sparsify(Net(bias=False), "str-global", example_inputs=x_batch())
    sd = to_official_state_dict(ours)
    assert {k for k in sd if k.endswith("sparseThreshold")} == {"conv1.sparseThreshold", "conv2.sparseThreshold",
                                                                 "fc.sparseThreshold"}
    for k in ("conv1", "conv2", "fc"):
        sd[f"{k}.sparseThreshold"] = torch.full([1, 1], -4.0)
    load_official_state_dict(ours, sd)
    assert float(ours.conv1.threshold_param()) == -4.0
    sd["fc.sparseThreshold"] = torch.full([1, 1], -5.0)
    with pytest.raises(ValueError, match="different sparseThreshold"):
        load_official_state_dict(ours, sd)
