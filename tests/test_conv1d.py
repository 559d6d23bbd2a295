"""transformers' Conv1D (GPT-2's projections: y = x @ W + b, W of shape (in, out)) under the weight
methods: a tiny GPT-2 from a config (no download) through every weight recipe, and each method's
layer against the same method on the equivalent nn.Linear (the transposed weight)."""
from __future__ import annotations

import importlib.util
import pathlib
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify.prepare.matching import Candidate, compile_match
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import find_state

if importlib.util.find_spec("transformers") is None:
    print("skipping: transformers is not installed (pip install fx-sparsify[integrations])")
pytest.importorskip("transformers", reason="transformers is not installed (pip install fx-sparsify[integrations])")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from sparsify.methods import magnitude, nm, st3, str as str_method  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "transformers_coverage", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "transformers_coverage.py")
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)

WEIGHT_RECIPES = ["st3", "st3-sigma", "str", "str-global", "gmp", "nm-2-4"]


def _conv1d_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def _sparsify(model, recipe, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the root falls back (untraceable): expected here
        return sparsify.sparsify(model, recipe, total_steps=4, example_inputs=inputs, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_gpt2_conv1d_layers_are_sparsified_trained_reported_and_finalized(recipe, dtype):
    # bfloat16 weights take the methods' paths for weights that are not float32 (gmp's scores
    # were made in the (out, in) layout there, and its update raised on Conv1D's (in, out) mask)
    torch.manual_seed(0)
    model, inputs, _ = cov.gpt2()
    model.to(dtype)
    names = _conv1d_names(model)
    assert len(names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of the 2 blocks
    m = _sparsify(model, recipe, inputs)
    mods = dict(m.named_modules())
    assert {e.name for e in find_state(m).plan.rewritten} >= set(names)
    for n in names:
        layer = mods[n]
        assert isinstance(layer, SparseWeightMixin) and isinstance(layer, Conv1D) and layer.out_axis == 1
        nx, nf = layer.weight.shape
        assert layer.weight is dict(model.named_modules())[n].weight  # the caller's tensor, not a copy
        for buf in ("mask",):
            if hasattr(layer, buf):
                assert getattr(layer, buf).shape == (nx, nf)
        if recipe.startswith("st3"):
            assert layer.scale.shape == (nf,)
        if recipe == "str":
            assert layer.s.shape == (1,)
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-2)
    m.train()
    for _ in range(2):
        loss = m(*inputs).logits.float().pow(2).mean() + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        assert all(mods[n].weight.grad is not None for n in names)
        opt.step()
        sparsify.step(m)
    rows = {r.name: r for r in sparsify.report(m).layers}
    assert set(rows) >= set(names)
    assert all(rows[n].params == mods[n].weight.numel() for n in names)
    if recipe in ("st3", "st3-sigma", "gmp", "nm-2-4"):  # scheduled sparsity: pruned by now
        assert all(rows[n].weight_sparsity > 0.3 for n in names)
    if recipe == "nm-2-4":
        assert all(rows[n].extra["nm_compliant"] for n in names)
    m.eval()
    with torch.no_grad():
        expected = m(*inputs).logits
    final = sparsify.finalize(m, inputs, rtol=1e-5, atol=1e-6)
    fmods = dict(final.named_modules())
    assert all(type(fmods[n]) is Conv1D for n in names)  # plain transformers Conv1D again
    assert not any(type(x).__module__.startswith("sparsify") for x in final.modules())
    with torch.no_grad():
        torch.testing.assert_close(final(*inputs).logits, expected, rtol=0, atol=0)


def _pair(nf=8, nx=12, seed=0):
    """A Conv1D and the nn.Linear computing the same function."""
    torch.manual_seed(seed)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        conv.bias.normal_()
    lin = nn.Linear(nx, nf)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return conv, lin


def test_st3_scale_runs_per_output_feature():
    conv, lin = _pair()
    c = st3.ST3_CLASSES[Conv1D].from_dense(conv)
    l_ = st3.ST3_CLASSES[nn.Linear].from_dense(lin)
    for layer in (c, l_):
        layer.set_threshold(0.01)
    torch.testing.assert_close(c.scale, l_.scale)
    assert torch.equal(c.mask, l_.mask.t())
    torch.testing.assert_close(c.effective_weight(), l_.effective_weight().t())
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(c(x), l_(x))
    # the reference formula (no caches) agrees
    ref = st3.st3_effective_weight(c.weight.detach(), float(c.tau), c.mask, c.scale, out_axis=1)
    torch.testing.assert_close(c.effective_weight(), ref)


def test_nm_groups_run_along_the_input_dimension():
    conv, lin = _pair(nf=6, nx=16)
    c = nm.NM_CLASSES[Conv1D].from_dense(conv)
    l_ = nm.NM_CLASSES[nn.Linear].from_dense(lin)
    for step in range(3):  # the first call writes the mask whole, later ones only what changed
        for layer in (c, l_):
            layer.recompute_mask(2, 4)
        assert torch.equal(c.mask, l_.mask.t())
        # every 4 consecutive input rows of a column keep exactly 2
        assert (c.mask.reshape(4, 4, 6).sum(1) == 2).all()
        torch.testing.assert_close(c.effective_weight(), l_.effective_weight().t())
        x = torch.randn(2, 16)
        torch.testing.assert_close(c(x), l_(x))
        with torch.no_grad():  # move the weights so masks change between calls
            noise = torch.randn(16, 6) * 0.05
            c.weight.add_(noise)
            l_.weight.add_(noise.t())
    assert nm.NMMethod().accepts(sparsify.methods.Site("c", Conv1D(4, 6))) is not None  # 6 inputs: not a multiple of 4


def test_str_channel_thresholds_are_per_output_feature():
    conv, lin = _pair()
    c = str_method.STR_CLASSES[Conv1D].from_dense(conv, granularity="channel", s_init=-3.0)
    l_ = str_method.STR_CLASSES[nn.Linear].from_dense(lin, granularity="channel", s_init=-3.0)
    assert c.s.shape == (1, 8) and l_.s.shape == (8, 1)
    with torch.no_grad():
        s = torch.linspace(-5, -1, 8)
        c.s.copy_(s[None])
        l_.s.copy_(s[:, None])
    torch.testing.assert_close(c.effective_weight(), l_.effective_weight().t())
    x = torch.randn(4, 12)
    c(x).pow(2).sum().backward()
    l_(x).pow(2).sum().backward()
    torch.testing.assert_close(c.s.grad, l_.s.grad.t())
    torch.testing.assert_close(c.weight.grad, l_.weight.grad.t())


def test_gmp_blocks_follow_the_out_by_in_layout():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(8, 12)

        def forward(self, x):
            return self.proj(x)

    recipe = {"version": 1, "name": "blocks", "rules": [
        {"match": {"type": "Linear"}, "method": "magnitude", "params": {"sparsity": 0.5, "block": [4, 2]}}]}
    torch.manual_seed(0)
    net = Net()
    m = sparsify.sparsify(net, recipe, example_inputs=(torch.randn(2, 12),))
    mask = m.proj.mask  # (in, out) = (12, 8); blocks are 4 outputs x 2 inputs
    blocks = mask.t().reshape(2, 4, 6, 2).permute(0, 2, 1, 3).reshape(12, 8)
    assert (blocks.all(1) | ~blocks.any(1)).all()  # each block kept or pruned whole
    assert float(mask.float().mean()) == 0.5
    why = magnitude.MagnitudeMethod().accepts(sparsify.methods.Site("p", Conv1D(6, 12), params={"block": [4, 2]}))
    assert "does not divide" in why  # 6 outputs are not a multiple of 4


def test_linear_rules_match_conv1d_and_sas_leaves_it_alone():
    c = Candidate("h.0.attn.c_attn", Conv1D(96, 32))
    assert compile_match({"type": "Linear"})(c) and compile_match({"type": "Conv1D"})(c)
    assert not compile_match({"type": "Conv1d"})(c)
    assert compile_match({"type": "Linear", "in_channels": {"min": 32}, "out_channels": {"min": 96}})(c)
    torch.manual_seed(0)
    model, inputs, _ = cov.gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, "sas", example_inputs=inputs)
    done = {e.name for e in plan.rewritten}
    assert not any(n in done for n in _conv1d_names(model))
    reasons = {e.name: e.reason for e in plan.entries}
    assert "not to transformers' Conv1D" in reasons["transformer.h.1.attn.c_attn"]
    # the rule that matched them is named, and sparsify's one line gives their reason: it counted
    # only lm_head ("1 matched site(s) stay dense (first: lm_head: input unknown ...)")
    assert {e.rule for e in plan.entries if e.name in _conv1d_names(model) and "Conv1D" in e.reason} == {0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(model, "sas", example_inputs=inputs)
    said = [str(w.message) for w in caught if "rewrote nothing" in str(w.message)]
    assert len(said) == 1 and "not to transformers' Conv1D" in said[0], said


def test_sparse_conv1d_pickles_and_its_class_resolves_by_name():
    conv, _ = _pair()
    layer = st3.ST3_CLASSES[Conv1D].from_dense(conv)
    layer.set_threshold(0.01)
    back = pickle.loads(pickle.dumps(layer))
    assert type(back) is type(layer) and torch.equal(back.mask, layer.mask)
    # a fresh process finds the class by name without having made it (module __getattr__)
    assert st3.__getattr__("ST3Conv1D") is st3.ST3_CLASSES[Conv1D]
    assert "ST3Conv1D" in repr(layer) and "nf=8, nx=12" in repr(layer)


def test_sparsify_imports_without_transformers_and_a_fresh_process_unpickles_conv1d(tmp_path):
    conv, _ = _pair()
    layer = nm.NM_CLASSES[Conv1D].from_dense(conv)
    layer.recompute_mask(2, 4)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    code = ("import sys, torch, sparsify, sparsify.methods; print('transformers' in sys.modules); "
            f"m = torch.load({str(path)!r}, weights_only=False); print(type(m).__name__, int(m.mask.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "NMConv1D", str(int(layer.mask.sum()))]
