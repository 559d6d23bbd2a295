"""Every method on every available device (``device`` fixture: cpu, and cuda where there is one),
and shape-only runs on the ``meta`` device, where a tensor made on the wrong device raises: the
methods, the buffer facility, the penalty kernels, report and finalize make their tensors on
their inputs' device, with no silent CPU copies."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import sparsify
from sparsify.core.buffers import LayerBuffers, workspace
from sparsify.core.state import find_state
from sparsify.deploy.semistructured24 import SemiStructuredError
from sparsify.methods.regularizers.kernels import hoyer_square, l1_sum, tl1_sum
from loops import run_steps, train

RECIPES = sorted(sparsify.builtin_recipes())
STEPS = 3


def _net(device):
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).to(device)


def _batches(device, n=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (4,), generator=g).to(device))
            for _ in range(n)]


def _tensors_off(model, device) -> list[str]:
    return [k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and v.device.type != device.type]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_reports_finalizes_and_round_trips_on_device(device, recipe):
    x0 = torch.zeros(1, 3, 32, 32, device=device)
    m = sparsify.sparsify(_net(device), recipe, total_steps=STEPS, example_inputs=x0)
    assert _tensors_off(m, device) == [], "the state lives on the model's device"
    losses = train(m, _batches(device))
    assert all(l == l and abs(l) < 1e3 for l in losses), losses
    assert _tensors_off(m, device) == []
    totals = sparsify.report(m).to_dict()["totals"]
    assert totals
    m.eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        expected = m(x)
    final = sparsify.finalize(m, x0)
    with torch.no_grad():
        got = final(x)
    assert got.device.type == device.type
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # state_dict round trip into a freshly sparsified model on the same device
    fresh = sparsify.sparsify(_net(device), recipe, total_steps=STEPS, example_inputs=x0)
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["gmp", "str", "str-global", "tl1", "dual", "sas", "sas-m4"])
def test_shape_only_training_step_on_meta(recipe):
    """Recipes whose first steps need no tensor values (no thresholds read back) build, run forward
    + penalty + backward on ``meta``: any tensor made on the CPU inside would raise here."""
    m = sparsify.sparsify(_net("meta"), recipe, total_steps=4, example_inputs=torch.zeros(1, 3, 32, 32, device="meta"))
    out = m(torch.zeros(2, 3, 32, 32, device="meta"))
    (out.sum() + sparsify.penalty(m)).backward()
    assert out.device.type == "meta"
    assert {p.grad.device.type for p in m.parameters() if p.grad is not None} == {"meta"}


def test_buffers_and_penalty_kernels_follow_their_inputs_device():
    like = torch.empty(3, 4, device="meta")
    bufs = LayerBuffers()
    assert bufs.buffer("w", like).device.type == "meta"
    assert bufs.target("w", like, torch.float16).dtype == torch.float16
    assert workspace((5, 2), torch.float32, torch.device("meta")).device.type == "meta"
    x = torch.randn(2, 8, 4, 4, device="meta", requires_grad=True)
    for f in (tl1_sum, l1_sum, hoyer_square):  # no value is read back to the host
        x.grad = None
        y = f(x)
        y.backward()
        assert y.device.type == "meta" and x.grad.device.type == "meta"


def test_semi_structured_finalize_is_refused_off_cuda_with_the_reason():
    m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nm-2-4", total_steps=4,
                          example_inputs=torch.zeros(1, 64))
    with pytest.raises(SemiStructuredError, match="need a CUDA device: the model is on cpu"):
        sparsify.finalize(m, semi_structured=True)
    with pytest.raises(ValueError, match="exclude each other"):
        sparsify.finalize(m, accelerate=True, semi_structured=True)


def test_semi_structured_finalize_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("torch's semi-structured sparse tensors run on CUDA only (the CPU refusal is tested above)")
    if torch.cuda.get_device_capability(device)[0] < 8:
        pytest.skip("semi-structured sparse tensors need compute capability 8.0 or newer")
    net = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128)).to(device)
    m = sparsify.sparsify(net, "nm-2-4", begin=0, fix=1, total_steps=4, example_inputs=torch.zeros(1, 128, device=device))
    sparsify.step(m)
    sparsify.step(m)
    x = torch.randn(64, 128, device=device)
    dense = sparsify.finalize(m).to(torch.bfloat16)
    fast = sparsify.finalize(m, semi_structured=torch.bfloat16)
    assert set(fast.semi_structured.values()) == {"2:4"}
    with torch.no_grad():
        torch.testing.assert_close(fast(x.bfloat16()), dense(x.bfloat16()), rtol=2e-2, atol=2e-2)


def test_semi_structured_decides_per_layer_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("torch's semi-structured sparse tensors run on CUDA only (the decisions are tested on the CPU "
                    "in test_deploy_guards.py)")
    if torch.cuda.get_device_capability(device)[0] < 8:
        pytest.skip("semi-structured sparse tensors need compute capability 8.0 or newer")
    from sparsify.deploy.semistructured24 import SemiStructuredLinear, to_semi_structured

    def net():
        torch.manual_seed(0)
        m = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(128, 4, batch_first=True),
                                 "odd": torch.nn.Linear(6, 128), "fc": torch.nn.Linear(128, 128)})
        with torch.no_grad():  # every weight 2:4 along its inputs, attention's out_proj included
            for lin in (m["attn"].out_proj, m["odd"], m["fc"]):
                lin.weight.mul_((torch.arange(lin.in_features) % 4 < 2).float())
        return m.to(device, torch.bfloat16)
    m = to_semi_structured(net())
    assert m.semi_structured == {"odd": "dense: weight is not 2:4 along its inputs", "fc": "2:4"}
    assert isinstance(m["fc"], SemiStructuredLinear) and type(m["attn"].out_proj) is not SemiStructuredLinear
    with pytest.raises(SemiStructuredError, match="^odd: dense: weight is not 2:4"):
        to_semi_structured(net(), strict=True)


@pytest.mark.parametrize("recipe", ["gmp", "dual", "st3", "semi-structured", "str"])
def test_an_average_kept_on_the_cpu_follows_the_model_on_device(device, recipe):
    # timm's ModelEmaV3(device="cpu") and AveragedModel(device="cpu") keep the average off the GPU;
    # sparsify.sync copies the sparsity across devices (decay 0: the average is the model)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    x0 = torch.zeros(1, 3, 32, 32, device=device)
    m = sparsify.sparsify(_net(device), recipe, total_steps=STEPS, example_inputs=x0)
    ema = AveragedModel(m, device="cpu", multi_avg_fn=get_ema_multi_avg_fn(0.0), use_buffers=True)
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01)
    run_steps(m, opt, _batches(device), penalty=True, after=lambda: (ema.update_parameters(m), sparsify.sync(ema, m)))
    assert _tensors_off(ema.module, torch.device("cpu")) == []
    from sparsify.core.averaging import sparsity_entries
    mine, theirs = sparsity_entries(ema.module), sparsity_entries(m)
    for k, v in theirs.items():
        if not k.endswith("_extra_state"):  # (the synced flag differs)
            assert torch.equal(mine[k], v.cpu()), k
    for (k, p), (_, q) in zip(ema.module.named_parameters(), m.named_parameters()):
        assert torch.equal(p, q.cpu()), k
    m.eval(), ema.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # another device's kernels (TF32 convolutions on CUDA): a loose tolerance
        torch.testing.assert_close(ema(x), m(x.to(device)).cpu(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_model_moved_after_sparsify_finalizes_on_its_stored_example_inputs(device, recipe):
    # sparsify on the CPU, then `.to("cuda")` and/or `.to(torch.bfloat16)` (docs/gpu.md): the
    # example inputs kept for finalize's check move and cast with the model (they stayed on the
    # CPU in float32 before, and finalize(model) raised torch's dtype/device mismatch)
    dtype = torch.bfloat16
    m = sparsify.sparsify(_net("cpu"), recipe, total_steps=STEPS, example_inputs=torch.randn(2, 3, 32, 32))
    m = m.to(device=device, dtype=dtype)
    (stored,) = find_state(m).example_inputs
    assert (stored.device.type, stored.dtype) == (device.type, dtype)
    batches = [(x.to(dtype), y) for x, y in _batches(device, 2)]
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.01)
    run_steps(m, opt, batches, penalty=True)
    assert sparsify.report(m).to_dict()["totals"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the schedule stops short of its end: 2 of 3 steps
        # checks the plain model against the sparse one on the stored inputs (bf16: a bf16 tolerance,
        # the GPU's kernels may order sums differently for the two)
        final = sparsify.finalize(m, rtol=1e-2, atol=1e-2)
    m.eval()
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(final(x), m(x), rtol=1e-2, atol=1e-2)


def test_sparsify_train_on_the_device_and_resume_on_the_cpu(device, tmp_path):
    # `sparsify train --device cuda --amp bf16`, interrupted, continued on the CPU: the checkpoint is
    # read to the CPU, the saved files hold CPU tensors (they load on a machine without a GPU)
    import os
    import signal
    from sparsify.app.train import TrainConfig, train as train_run
    if device.type == "cpu":
        pytest.skip("the cpu run is tests/test_train.py's; this one moves a run off a GPU")
    base = dict(model="cnn", recipe="st3", data="digits", epochs=2, progress=False, threads=1)

    def interrupt(step):
        if step == 30:
            os.kill(os.getpid(), signal.SIGINT)
    out = tmp_path / "run"
    assert train_run(TrainConfig(**base, out=str(out), device=str(device), amp="bf16"), on_step=interrupt,
                     quiet=True)["interrupted"]
    res = train_run(TrainConfig(resume=str(out), device="cpu", progress=False), quiet=True)
    assert res["finalize"] == "ok" and res["config"]["amp"] == "bf16" and res["accuracy"] > 0.3
    saved = torch.load(out / "final_state_dict.pt", map_location=None, weights_only=True)
    assert {v.device.type for v in saved.values() if isinstance(v, torch.Tensor)} == {"cpu"}
