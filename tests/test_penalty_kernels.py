"""The low-allocation penalty kernels (sparsify/methods/penalty_kernels.py) against the plain
autograd compositions: values, gradients, chunking, dtypes, allocations, ReLU detection."""
from __future__ import annotations

import threading

import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import sparsify
from sparsify.methods.regularizers import kernels as penalty_kernels
from sparsify.methods.regularizers import ActivationRegularizer, penalty_value

A = 0.7


def composition(x: torch.Tensor, function: str, reduction: str) -> torch.Tensor:
    """What the penalty is defined as, written the obvious way (autograd differentiates it)."""
    t = x.abs()
    v = {"tl1": lambda: ((1.0 + A) * t / (A + t)).sum(),
         "l1": lambda: t.sum(),
         "hoyer": lambda: t.sum() ** 2 / (x * x).sum()}[function]()
    return v / x.numel() if reduction == "mean" else v


def with_zeros(shape, dtype=torch.float32, nonneg=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x[x.abs() < 0.4] = 0.0  # exact zeros: where |x| has its kink
    return x.relu() if nonneg else x


@pytest.fixture
def small_chunks(monkeypatch):
    # many chunks and a ragged last one even for tiny tensors
    monkeypatch.setattr(penalty_kernels, "CHUNK", 37)


@pytest.mark.parametrize("function", ["tl1", "l1", "hoyer"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("nonneg", [False, True])
def test_float32_value_and_gradient_equal_the_composition(function, reduction, nonneg, small_chunks):
    x = with_zeros((3, 4, 9, 7), nonneg=nonneg).requires_grad_()
    v = penalty_value(x, function, A, reduction, nonneg=nonneg)
    g, = torch.autograd.grad(v, x)
    r = composition(x, function, reduction)
    g_ref, = torch.autograd.grad(r, x)
    assert v.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(v, r)
    torch.testing.assert_close(g, g_ref)
    assert torch.equal(g == 0, g_ref == 0)  # same zeros: sign(0) = 0 at the kink


@pytest.mark.parametrize("function", ["tl1", "l1", "hoyer"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("nonneg", [False, True])
def test_gradcheck_in_float64(function, reduction, nonneg, small_chunks):
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    x = x.abs() + 0.1 if nonneg else x + 0.1 * x.sign()  # away from the kink, where finite differences hold
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: penalty_value(t, function, A, reduction, nonneg=nonneg), (x,))
    v = penalty_value(x, function, A, reduction, nonneg=nonneg)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, composition(x, function, reduction), rtol=1e-13, atol=0)


@pytest.mark.parametrize("function", ["tl1", "l1", "hoyer"])
@pytest.mark.parametrize("upstream", [-2.5, 0.0])
def test_any_upstream_gradient_scales_the_result(function, upstream, small_chunks):
    x = with_zeros((5, 9)).requires_grad_()
    go = torch.tensor(upstream)
    g, = torch.autograd.grad(penalty_value(x, function, A, "sum"), x, grad_outputs=go)
    g_ref, = torch.autograd.grad(composition(x, function, "sum"), x, grad_outputs=go)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("function", ["tl1", "l1", "hoyer"])
def test_weight_and_batchmean_scale_value_and_gradient(function):
    x = with_zeros((4, 6)).requires_grad_()
    v = penalty_value(x, function, A, "batchmean", weight=0.3)
    g, = torch.autograd.grad(v, x)
    r = 0.3 * composition(x, function, "sum") / 4
    g_ref, = torch.autograd.grad(r, x)
    torch.testing.assert_close(v, r)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("function", ["tl1", "l1", "hoyer"])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_chunks_follow_memory_order_of_any_layout(function, layout, small_chunks):
    x = with_zeros((2, 5, 6, 4))
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(1, 3)[:, ::2]
    x.requires_grad_()
    g, = torch.autograd.grad(penalty_value(x, function, A, "sum"), x)
    g_ref, = torch.autograd.grad(composition(x, function, "sum"), x)
    torch.testing.assert_close(penalty_value(x, function, A, "sum"), composition(x, function, "sum"))
    torch.testing.assert_close(g, g_ref)
    if layout == "channels_last":
        assert g.is_contiguous(memory_format=torch.channels_last)  # the gradient has the activation's layout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("function", ["tl1", "l1", "hoyer"])
def test_half_precision_maps_are_summed_in_float32(dtype, function, small_chunks):
    x = with_zeros((3, 50), dtype=dtype).requires_grad_()
    v = penalty_value(x, function, A, "sum")
    g, = torch.autograd.grad(v, x)
    x32 = x.detach().float().requires_grad_()
    r = composition(x32, function, "sum")
    g_ref, = torch.autograd.grad(r, x32)
    assert v.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(v, r)  # float32 tolerance: nothing was rounded to half precision
    torch.testing.assert_close(g, g_ref.to(dtype))  # rounded once, at the end


def test_all_zero_map_and_empty_map():
    z = torch.zeros(3, 4, requires_grad=True)
    for function in ("tl1", "l1", "hoyer"):
        v = penalty_value(z, function, A, "sum")
        g, = torch.autograd.grad(v, z)
        assert float(v) == 0.0 and torch.equal(g, torch.zeros_like(z))
    assert float(penalty_value(torch.zeros(0, 3), "tl1", A, "sum")) == 0.0


def _allocations(p) -> list[int]:
    """Bytes each op allocated for itself (an op's output or temporaries), above 1 KiB."""
    return [e.self_cpu_memory_usage for e in p.events() if e.self_cpu_memory_usage > 1024]


@pytest.mark.parametrize("function", ["tl1", "l1", "hoyer"])
@pytest.mark.parametrize("nonneg", [False, True])
def test_forward_allocates_nothing_map_sized_and_backward_only_the_gradient(function, nonneg):
    x = with_zeros((4, 16, 32, 32), nonneg=nonneg).requires_grad_()  # 256 KiB: bigger than any work buffer use
    penalty_value(x, function, A, nonneg=nonneg).backward()  # creates this thread's work buffers
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        v = penalty_value(x, function, A, nonneg=nonneg)
    assert _allocations(p) == []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        v.backward()
    assert _allocations(p) == [x.nbytes]  # the returned gradient, nothing else


def test_work_buffers_are_per_thread():
    mine = penalty_kernels._work(0, 10, torch.float32, torch.device("cpu"))
    other = []
    t = threading.Thread(target=lambda: other.append(penalty_kernels._work(0, 10, torch.float32,
                                                                           torch.device("cpu"))))
    t.start()
    t.join()
    assert mine.untyped_storage().data_ptr() != other[0].untyped_storage().data_ptr()
    assert penalty_kernels._work(0, 10, torch.float32, torch.device("cpu")).data_ptr() == mine.data_ptr()


def test_relu_outputs_are_marked_nonnegative_and_give_the_same_penalty():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    m = sparsify.sparsify(net, "tl1", example_inputs=x)
    regs = [r for r in m.modules() if isinstance(r, ActivationRegularizer)]
    assert len(regs) == 17 and all(r.nonneg for r in regs)
    m(x)
    fast = sparsify.penalty(m)
    for r in regs:
        r.nonneg = False
    m(x)
    torch.testing.assert_close(fast, sparsify.penalty(m))
    pre = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "tl1", example_inputs=x, placement="pre")
    assert not any(r.nonneg for r in pre.modules() if isinstance(r, ActivationRegularizer))


def test_gelu_and_functional_relu_detection():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act = nn.Linear(4, 4), nn.GELU()

        def forward(self, x):
            return torch.relu(self.act(self.a(x)))

    rec = {"version": 1, "rules": [{"match": {"type": ["GELU"], "op": ["relu"]}, "method": "tl1"}]}
    m = sparsify.sparsify(Net(), rec, example_inputs=torch.randn(2, 4))
    flags = {r.regularizes: r.nonneg for r in m.modules() if isinstance(r, ActivationRegularizer)}
    assert flags == {"act": False, "relu": True}


def test_tracers_get_the_plain_expression_so_torch_compile_sees_no_break():
    import torch._dynamo as dynamo
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GELU())
    x = torch.randn(2, 3, 8, 8)
    rec = {"version": 1, "rules": [{"match": {"type": ["ReLU", "GELU"]}, "method": "tl1",
                                    "params": {"reduction": "sum"}}]}
    m = sparsify.sparsify(net, rec, example_inputs=x)
    m(x)
    eager = sparsify.penalty(m)
    dynamo.reset()
    ex = dynamo.explain(m)(x)
    assert ex.graph_count == 1 and ex.graph_break_count == 0  # the kernels' loops and buffers would break it
    traced = sparsify.penalty(m)
    torch.testing.assert_close(traced, eager)
    h = net[1](net[0](x))
    ref = penalty_kernels.plain_penalty(h, "tl1") + penalty_kernels.plain_penalty(net[3](net[2](h)), "tl1")
    torch.testing.assert_close(eager, 0.01 * ref)  # the default lam


@pytest.mark.parametrize("recipe", ["tl1", "activation-l1", "activation-hoyer"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sparsify_penalty_keeps_a_float64_models_precision(recipe, dtype):
    """Each term of a float64 model is float64, and sparsify.penalty rounded their sum to float32;
    a bfloat16 model's terms are summed in float32 (not in bfloat16)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()).to(dtype)
    m = sparsify.sparsify(net, recipe, total_steps=4, example_inputs=torch.zeros(1, 3, 8, 8, dtype=dtype))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m(x.to(dtype))
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert sparsify.penalty(m).dtype == want
