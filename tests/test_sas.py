"""SAS modules and slot rules (docs/methods/sas.md): the official M = 2 computation, the two-conv identity,
the oracles on special weights/inputs, general M, AMP, padding modes, deployment."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify.methods.sas import (SASConv1d, SASConv2d, SASConv3d, SASLinear, SignedLevelsRule, SignRule, make_slot_rule, register_slot_rule)


# ---- a small reference of the official code (DensoITLab/sas_, sas_conv2d.py / sas_linear.py) ------

def official_projection(x: torch.Tensor) -> torch.Tensor:
    """The official SAS_proj for M = 2: a zeros tensor with an extra slot axis after the channels,
    |x| masked by the sign written into slot 0 (x > 0) and slot 1 (x <= 0), then interleaved."""
    shape = list(x.shape)
    ch = 1 if x.dim() > 2 else -1
    proj_shape = shape[:ch % x.dim() + 1] + [2] + shape[ch % x.dim() + 1:]
    proj = torch.zeros(proj_shape, dtype=x.dtype, device=x.device)
    y = x.abs()
    with torch.no_grad():
        sgn = (x > 0).float()
    idx = [slice(None)] * len(proj_shape)
    idx[ch % x.dim() + 1] = 0
    proj[tuple(idx)] = y * sgn
    idx[ch % x.dim() + 1] = 1
    proj[tuple(idx)] = y * (1.0 - sgn)
    return proj.flatten(ch % x.dim(), ch % x.dim() + 1)


def official_conv(x, weight, bias, **kw):
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    return conv(official_projection(x), weight, bias, **kw)


def official_linear(x, weight, bias):
    return F.linear(official_projection(x), weight, bias)


def two_convs(x, weight, bias, **kw):
    """docs/methods/sas.md: SAS(x) = conv(relu(x), W[:, 0::2]) + conv(relu(-x), W[:, 1::2]) + b."""
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    return conv(x.relu(), weight[:, 0::2], bias, **kw) + conv((-x).relu(), weight[:, 1::2], None, **kw)


def _grads(fn, x, *params):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) if p is not None else None for p in params]
    out = fn(x, *params)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    return out.detach(), x.grad, [p.grad for p in params if p is not None]


def _assert_same(a, b, tol=1e-5):
    out_a, gx_a, gp_a = a
    out_b, gx_b, gp_b = b
    scale = max(1.0, float(out_a.abs().max()))
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(gx_a, gx_b, rtol=tol, atol=tol * max(1.0, float(gx_a.abs().max())))
    for ga, gb in zip(gp_a, gp_b):
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol * max(1.0, float(ga.abs().max())))


CONV_CASES = [  # (cin, cout, kernel, stride, padding, dilation, groups)
    (6, 4, 3, 1, 1, 1, 1),
    (6, 9, 3, 2, 0, 1, 3),
    (8, 8, 3, 1, 2, 2, 8),   # depthwise, dilated
    (4, 6, 1, 1, 0, 1, 2),
    (5, 3, (3, 1), (2, 1), (1, 0), 1, 1),
    (6, 5, 1, 2, 0, 1, 1),   # strided 1x1 (ResNet downsample): only the positions read are projected
    (6, 6, 1, (2, 3), 0, 3, 3),
    (6, 6, 1, 2, 1, 1, 6),   # strided 1x1 with padding, depthwise: the ordinary paths
]


def _sas_conv(cin, cout, k, s, p, d, g, bias=True):
    torch.manual_seed(cin * 31 + cout)
    return SASConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_equals_official_and_two_convs(case, recompute):
    layer = _sas_conv(*case)
    layer.sas_recompute = recompute
    cin, _, _, s, p, d, g = case
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    x = torch.randn(2, cin, 9, 8)
    x[0, 0, :2] = 0.0  # exact zeros: relu'(0) = 0 in every formulation
    ours = _grads(lambda x, w, b: SASConv2d.forward(_with(layer, w, b), x), x, layer.weight, layer.bias)
    _assert_same(ours, _grads(lambda x, w, b: official_conv(x, w, b, **kw), x, layer.weight, layer.bias))
    if g == 1:
        _assert_same(ours, _grads(lambda x, w, b: two_convs(x, w, b, **kw), x, layer.weight, layer.bias))
    _assert_same(ours, _grads(lambda x, w, b: _with(layer, w, b).reference_forward(x), x, layer.weight, layer.bias))


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("case", [(16, 8, 3, 1, 1, 1, 1), (16, 12, 3, 2, 1, 1, 4), (16, 8, 1, 1, 0, 1, 1)])
def test_small_spatial_conv_per_slot_backward_equals_official(case, recompute):
    """Fewer output positions than wide input channels (ResNet layer4 on CPU): the backward runs
    one narrow conv per slot (recompute) instead of the wide conv; same gradients."""
    from sparsify.methods.sas.kernel import _per_slot_backward
    layer = _sas_conv(*case)
    layer.sas_recompute = recompute
    cin, _, _, s, p, d, g = case
    x = torch.randn(2, cin, 3, 3)
    x[1, :3] = 0.0
    assert _per_slot_backward(x, layer(x), 2)
    ours = _grads(lambda x, w, b: _with(layer, w, b)(x), x, layer.weight, layer.bias)
    _assert_same(ours, _grads(lambda x, w, b: official_conv(x, w, b, stride=s, padding=p, dilation=d, groups=g),
                              x, layer.weight, layer.bias))


def _with(layer, weight, bias):
    """``layer`` computing with the given (leaf) tensors, so gradients can be compared."""
    import copy
    new = copy.copy(layer)
    new._parameters = dict(layer._parameters)
    new._parameters["weight"] = weight
    new._parameters["bias"] = bias
    return new


def test_conv1d_conv3d_and_no_bias():
    torch.manual_seed(0)
    c1 = SASConv1d(4, 5, 3, padding=1, bias=False)
    x = torch.randn(3, 4, 11)
    _assert_same(_grads(lambda x, w: _with(c1, w, None)(x), x, c1.weight),
                 _grads(lambda x, w: official_conv(x, w, None, padding=1), x, c1.weight))
    c3 = SASConv3d(2, 3, 3, stride=2, groups=1)
    x = torch.randn(1, 2, 5, 6, 7)
    _assert_same(_grads(lambda x, w, b: _with(c3, w, b)(x), x, c3.weight, c3.bias),
                 _grads(lambda x, w, b: official_conv(x, w, b, stride=2), x, c3.weight, c3.bias))


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6), (2, 2, 3, 6)])
def test_linear_any_rank_equals_official(shape, recompute):
    torch.manual_seed(1)
    lin = SASLinear(6, 4, recompute=recompute)
    x = torch.randn(*shape)
    x[0, ..., :2] = 0.0
    ref = _grads(lambda x, w, b: official_linear(x.reshape(-1, 6), w, b).reshape(*shape[:-1], 4),
                 x, lin.weight, lin.bias)
    _assert_same(_grads(lambda x, w, b: _with(lin, w, b)(x), x, lin.weight, lin.bias), ref)


def test_shared_workspace_never_leaks_into_results():
    """Every SAS layer projects into one per-thread scratch buffer: a layer applied twice before one
    backward still gets the official gradients, and an output survives the next layer's forward."""
    torch.manual_seed(5)
    conv, lin = SASConv2d(4, 4, 3, padding=1), SASLinear(4, 3)
    x = torch.randn(2, 4, 6, 6)
    x[0, 0, 0] = 0.0

    def ours(x, wc, bc, wl, bl):
        c = _with(conv, wc, bc)
        return _with(lin, wl, bl)(c(c(x)).mean((2, 3)))

    def official(x, wc, bc, wl, bl):
        h = official_conv(official_conv(x, wc, bc, padding=1), wc, bc, padding=1)
        return official_linear(h.mean((2, 3)), wl, bl)
    params = (conv.weight, conv.bias, lin.weight, lin.bias)
    _assert_same(_grads(ours, x, *params), _grads(official, x, *params))
    y = conv(x).detach()
    kept = y.clone()
    conv(torch.randn(3, 4, 9, 9))
    assert torch.equal(y, kept)


def test_layers_in_threads_get_their_own_workspace():
    from concurrent.futures import ThreadPoolExecutor
    torch.manual_seed(6)
    layer = SASConv2d(4, 5, 3, padding=1)
    xs = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    ref = [_grads(lambda x, w, b: official_conv(x, w, b, padding=1), x, layer.weight, layer.bias) for x in xs]

    def work(i):
        return [_grads(lambda x, w, b: _with(layer, w, b)(x), xs[i], layer.weight, layer.bias) for _ in range(15)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(work, range(3)))
    for i, runs in enumerate(results):
        for r in runs:
            _assert_same(r, ref[i])


def test_official_initialisation_and_state_dict_layout():
    torch.manual_seed(0)
    layer = SASConv2d(16, 32, 3, padding=1)
    assert layer.weight.shape == (32, 32, 3, 3) and layer.in_channels == 16
    bound = 1 / math.sqrt(32 * 9)  # kaiming_uniform(a=sqrt 5) over the wide fan-in
    assert float(layer.weight.abs().max()) <= bound + 1e-7
    assert float(layer.weight.abs().max()) > 0.9 * bound
    assert float(layer.bias.abs().max()) <= 1 / math.sqrt(16 * 9) + 1e-7  # official: narrow fan-in
    # an official state_dict (same keys, interleaved layout) loads as is and gives its outputs
    official = {"weight": torch.randn(32, 32, 3, 3), "bias": torch.randn(32)}
    layer.load_state_dict(official)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(layer(x), official_conv(x, official["weight"], official["bias"], padding=1),
                               rtol=1e-5, atol=1e-5)


def test_oracles_on_special_weights_and_inputs():
    torch.manual_seed(2)
    dense = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    w = dense.weight.detach()
    layer = SASConv2d.from_dense(dense)  # default: negative half zero
    assert torch.equal(layer.weight[:, 0::2], w) and not layer.weight[:, 1::2].any()
    x = torch.randn(2, 6, 7, 7)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), dense(x.relu()), **tol)                # W- = 0: conv(relu x, W+)
    with torch.no_grad():
        layer.weight[:, 1::2] = torch.randn_like(w)
    torch.testing.assert_close(layer(x.abs()), dense(x.abs()), **tol)          # x >= 0: the dense conv
    with torch.no_grad():
        layer.weight[:, 1::2] = -w
    torch.testing.assert_close(layer(x), dense(x), **tol)                       # W- = -W+: conv(x, W+)
    ident = SASConv2d.from_dense(dense, coefficients=SignRule().identity_coefficients())
    torch.testing.assert_close(ident(x), dense(x), **tol)


def test_padding_modes_and_same_padding():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 7, 6)
    for kw in (dict(padding=1, padding_mode="reflect"), dict(padding="same"), dict(padding=1, padding_mode="circular")):
        layer = SASConv2d(4, 5, 3, **kw)
        _assert_same(_grads(lambda x, w, b: _with(layer, w, b)(x), x, layer.weight, layer.bias),
                     _grads(lambda x, w, b: _with(layer, w, b).reference_forward(x), x, layer.weight, layer.bias))


@pytest.mark.parametrize("recompute", [False, True])
def test_saved_for_backward(recompute):
    layer = SASConv2d(8, 8, 3, padding=1, recompute=recompute)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    # the weight parameter, the bias, and x (recompute) or the slots (x is rebuilt from them)
    assert sorted(saved) == sorted([8, layer.weight.numel(), x.numel() if recompute else 2 * x.numel()])
    _assert_same(_grads(lambda x, w, b: _with(layer, w, b)(x), x, layer.weight, layer.bias),
                 _grads(lambda x, w, b: official_conv(x, w, b, padding=1), x, layer.weight, layer.bias))


def test_bfloat16_autocast():
    torch.manual_seed(4)
    layer = SASConv2d(8, 6, 3, padding=1)
    lin = SASLinear(6, 3)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(layer(x).mean((2, 3)))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    ref = lin.reference_forward(layer.reference_forward(x.detach()).mean((2, 3)))
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


# ---- slot rules -------------------------------------------------------------------------------

def test_signed_levels_with_two_slots_is_the_sign_rule():
    x = torch.randn(1000)
    x[:10] = 0
    for a, b in zip(SignedLevelsRule(2).slots(x), SignRule().slots(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("m", [3, 4, 6])
def test_signed_levels_one_hot_and_coefficients(m):
    rule = make_slot_rule("auto", m)
    assert isinstance(rule, SignedLevelsRule)
    x = torch.randn(20000)
    slots = torch.stack(rule.slots(x))
    assert ((slots != 0).sum(0) <= 1).all()                       # at most one slot active
    assert torch.equal(slots.sum(0), x.abs())                      # the active slot holds |x|
    for coeffs, target in ((rule.identity_coefficients(), x), (rule.relu_coefficients(), x.relu())):
        torch.testing.assert_close((torch.tensor(coeffs)[:, None] * slots).sum(0), target)
    if m % 2 == 0:  # equal shares of a unit normal per slot
        shares = (slots != 0).float().mean(1)
        assert torch.allclose(shares, torch.full((m,), 1 / m), atol=0.02)


def test_general_m_layer_gradients_float64():
    torch.manual_seed(5)
    layer = SASConv2d(2, 2, 3, padding=1, m=4).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _with(layer, w, layer.bias)(x), (x, layer.weight))
    _assert_same(_grads(lambda x, w, b: _with(layer, w, b)(x), x, layer.weight, layer.bias),
                 _grads(lambda x, w, b: _with(layer, w, b).reference_forward(x), x, layer.weight, layer.bias),
                 tol=1e-9)
    dense = nn.Linear(5, 3)
    lin = SASLinear.from_dense(dense, m=3, coefficients=make_slot_rule("auto", 3).relu_coefficients())
    z = torch.randn(4, 5)
    torch.testing.assert_close(lin(z), dense(z.relu()))


def test_slot_rule_errors_and_registration():
    with pytest.raises(ValueError, match="exactly 2 slots"):
        make_slot_rule("sign", 4)
    with pytest.raises(ValueError, match="unknown slot rule 'nope'"):
        make_slot_rule("nope", 2)

    @register_slot_rule
    class Swapped(SignRule):
        """A user rule: the sign rule with the slots swapped, through the generic (autograd) paths."""
        name = "test_swapped"

        def slots(self, x):
            return [torch.relu(-x), torch.relu(x)]

        def relu_coefficients(self):
            return [0.0, 1.0]

        def identity_coefficients(self):
            return [-1.0, 1.0]

        def project(self, x, dim, out=None):
            return super(SignRule, self).project(x, dim, out)

        def project_backward(self, x, grads, slots=None):
            return super(SignRule, self).project_backward(x, grads, slots)

    layer = SASLinear(4, 2, slot_rule="test_swapped")
    x = torch.randn(3, 4) * 3
    _assert_same(_grads(lambda x, w, b: _with(layer, w, b)(x), x, layer.weight, layer.bias),
                 _grads(lambda x, w, b: _with(layer, w, b).reference_forward(x), x, layer.weight, layer.bias))
    swapped = torch.cat([layer.weight[:, 1::2], layer.weight[:, 0::2]], 1).reshape(2, 2, 4).transpose(1, 2)
    torch.testing.assert_close(layer(x), official_linear(x, swapped.reshape(2, 8), layer.bias))


def test_deploy_module_is_plain_and_exportable():
    torch.manual_seed(6)
    layer = SASConv2d(4, 6, 3, stride=2, padding=1, groups=2, m=4)
    lin = SASLinear(6, 3)
    x = torch.randn(2, 4, 8, 8)
    for mod, inp in ((layer, x), (lin, torch.randn(2, 5, 6))):
        dep = mod.deploy_module()
        assert isinstance(dep, torch.fx.GraphModule)
        assert {n.op for n in dep.graph.nodes} <= {"placeholder", "get_attr", "call_function", "call_method", "output"}
        torch.testing.assert_close(dep(inp), mod(inp))
        assert set(dep.state_dict()) == set(mod.state_dict())
        exported = torch.export.export(dep, (inp,))
        torch.testing.assert_close(exported.module()(inp), mod(inp))


def test_second_derivatives_are_refused_in_one_line_and_taken_through_torch_func(monkeypatch):
    """A gradient penalty (``create_graph=True``) failed inside torch on the kernel's out= writes;
    it is refused with what to do instead, and torch.func's grad of grad (SAS runs plain ops under
    transforms) equals autograd's through the reference forward."""
    from torch.func import functional_call, grad

    import sparsify
    from sparsify.methods.sas.layer import SASMixin

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    x = torch.randn(2, 3, 8, 8)
    m = sparsify.sparsify(net, "sas", total_steps=4, example_inputs=(x,))
    xr = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="SAS layers have no second derivative"):
        torch.autograd.grad(m(xr).logsumexp(1).sum(), xr, create_graph=True)

    params = {k: v.detach() for k, v in m.named_parameters()}

    def penalty(p):
        return grad(lambda xi: functional_call(m, p, (xi,)).logsumexp(1).sum())(x).pow(2).sum()

    through_func = grad(penalty)(params)
    monkeypatch.setattr(SASMixin, "forward", lambda self, inp: self.reference_forward(inp))
    xr = x.clone().requires_grad_()
    gx, = torch.autograd.grad(m(xr).logsumexp(1).sum(), xr, create_graph=True)
    m.zero_grad()
    gx.pow(2).sum().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(through_func[name], p.grad, msg=lambda msg: f"{name}: {msg}")


def test_finalize_keeps_the_attributes_model_code_reads():
    # timm's davit Downsample reads k_h, k_w = self.conv.kernel_size in a forward torch.fx cannot trace
    # (shape-dependent padding): the deployed SAS module had no kernel_size, so finalize failed there
    import warnings
    import sparsify

    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3)

        def forward(self, x):
            k_h, k_w = self.conv.kernel_size
            if x.shape[-1] % k_w:
                x = F.pad(x, (0, k_w - x.shape[-1] % k_w))
            return self.conv(x) * self.conv.in_channels / 8

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stage, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Module(), nn.Linear(8, 4)
            self.stage.downsample = Down()  # the recipe converts downsample convs as they are (davit's too)

        def forward(self, x):
            return self.fc(self.stage.downsample(F.relu(self.stem(x))).mean((2, 3)))

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(Net(), "sas", example_inputs=x, total_steps=4)
        assert type(m.stage.downsample.conv).__name__ == "SASConv2d"
        final = sparsify.finalize(m)
    assert final.stage.downsample.conv.kernel_size == (3, 3) and final.stage.downsample.conv.in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(final(x), m.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, args", [(SASLinear, (64, 512)), (SASConv2d, (16, 512, 2))])
def test_fresh_layer_bias_is_bounded_by_the_narrow_fan_in(cls, args):
    # the official initialisation: bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the dense layer's
    # fan-in (64), not the M-times-wider weight's (128): its values reach past 1/sqrt(128)
    torch.manual_seed(0)
    layer = cls(*args, m=2)
    bound = 1 / math.sqrt(64)
    b = layer.bias.detach().abs()
    assert float(b.max()) <= bound
    assert float(b.max()) > 1 / math.sqrt(128)
