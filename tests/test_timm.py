"""timm models, called the way timm users call them (docs/integrations.md#timm, docs/coverage-timm.md).

Small models and inputs; random weights (``pretrained=False``), nothing downloaded.
"""
from __future__ import annotations

import importlib.util
import io
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsify
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.state import find_state

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[dev]')")

_spec = importlib.util.spec_from_file_location(
    "timm_coverage", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "timm_coverage.py")
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)


def _model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def _x(side, n=2):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def _reloaded(name, final, **kwargs):
    """``final``'s state_dict saved and loaded into a freshly built timm model."""
    buf = io.BytesIO()
    torch.save(final.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    fresh = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh.eval()


def test_conv2d_same_keeps_its_padding_sparse_and_after_finalize():
    """tf_efficientnet_b0's stride-2 convs are ``Conv2dSame`` (TF 'same' padding computed from the
    input size). The sparse layers pad as they did, so at sparsity 0 the model is the dense one on
    an odd input size; at 90% the finalized layers are ``Conv2dSame`` again with sparse weights and
    load into a fresh timm model with equal outputs."""
    from timm.layers import Conv2dSame
    dense = _model("tf_efficientnet_b0")
    same = [n for n, m in dense.named_modules() if type(m) is Conv2dSame]
    assert same
    x = _x(33)
    zero = sparsify.sparsify(dense, "gmp", total_steps=10, example_inputs=(x,))  # before begin: all weights kept
    assert all(isinstance(zero.get_submodule(n), SparseWeightMixin) for n in same)
    with torch.no_grad():
        torch.testing.assert_close(zero.eval()(x), dense(x))
    m = sparsify.sparsify(dense, "st3", total_steps=10, example_inputs=(x,), begin=0, end=0, fix=None)
    final = sparsify.finalize(m.eval(), (x,), rtol=1e-3, atol=1e-4)
    for n in same:
        layer = final.get_submodule(n)
        assert type(layer) is Conv2dSame
        assert (layer.weight == 0).any()  # ST-3's global threshold: the depthwise ones less than 90%
    with torch.no_grad():
        torch.testing.assert_close(_reloaded("tf_efficientnet_b0", final)(x), final(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,cls", [("resnetv2_50x1_bit", "StdConv2d"), ("nf_resnet26", "ScaledStdConv2d")])
def test_weight_standardised_convs_stay_dense_with_a_reason_and_a_warning(name, cls):
    """A sparse plain conv in place of a weight-standardising one would drop the standardisation
    (and masking the stored weight gives no zeros in the standardised kernel): left dense."""
    dense = _model(name)
    x = _x(32)
    with pytest.warns(UserWarning, match=f"class {cls} left dense \\(first: .*{cls} computes with its own forward"):
        m = sparsify.sparsify(dense, "st3", total_steps=10, example_inputs=(x,))
    plan = find_state(m).plan
    std = [e for e in plan.entries if e.kind == cls]
    assert std and all(e.method is None and "its own forward" in e.reason for e in std)
    assert any(e.method == "st3" for e in plan.entries)  # the head (a plain Linear/Conv2d) is sparse
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), dense(x))  # the step-0 weights: the dense model's output
    final = sparsify.finalize(m, (x,))
    assert type(final.get_submodule(std[0].name)).__name__ == cls


def test_timm_model_api_keeps_working_on_the_sparsified_model(monkeypatch):
    """forward_features / forward_head / get_classifier / pretrained_cfg / resolve_data_config /
    set_grad_checkpointing on a sparsified ViT, and forward_features runs the sparse layers."""
    dense = _model("vit_tiny_patch16_224", img_size=32)
    x = _x(32)
    m = sparsify.sparsify(dense, "st3", total_steps=10, example_inputs=(x,), begin=0, end=0, fix=None).eval()
    assert m.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
    assert timm.data.resolve_data_config(model=m)["input_size"] == timm.data.resolve_data_config(model=dense)["input_size"]
    assert isinstance(m.get_classifier(), SparseWeightMixin)
    called = []
    hooks = [mod.register_forward_hook(lambda *a: called.append(1)) for mod in m.modules()
             if isinstance(mod, SparseWeightMixin)]
    with torch.no_grad():
        feats = m.forward_features(x)
    assert len(called) == len(hooks) - 1  # every sparse layer but the head
    for h in hooks:
        h.remove()
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(m.forward_head(feats), out)
        assert m.forward_head(feats, pre_logits=True).shape == (2, 192)
        assert not torch.allclose(out, dense(x))  # the sparse weights are the ones used
    checkpointed = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: checkpointed.append(1) or real(*a, **k))
    m.train().set_grad_checkpointing(True)
    m(x).sum().backward()
    assert len(checkpointed) == len(m.blocks)  # timm's checkpoint_seq ran: the flag is read at call time
    assert m.blocks[0].mlp.fc1.weight.grad is not None


def test_reset_classifier_after_sparsify_keeps_the_new_head():
    """timm's ``reset_classifier`` puts a new dense head where the sparse one was: it stays, the old
    one leaves the groups (said once) and finalize does not put it back."""
    m = sparsify.sparsify(_model("resnet18"), "st3", total_steps=10, example_inputs=(_x(32),))
    m.reset_classifier(5)
    with pytest.warns(UserWarning, match="fc replaced after sparsify"):
        sparsify.step(m)
    assert "fc" not in {layer.name for layer in sparsify.report(m).layers}
    final = sparsify.finalize(m, (_x(32),))
    assert final.fc.out_features == 5 and final.eval()(_x(32)).shape == (2, 5)


@pytest.mark.parametrize("recipe", ["gmp", "st3"])
def test_an_ema_copy_made_before_reset_classifier_keeps_updating(recipe):
    """timm's ModelEmaV3 copies every state_dict entry in place: the group's extra state keeps its
    size when the replaced head leaves the group (it shrank by the head's name, and update failed)."""
    from timm.utils import ModelEmaV3
    x, y = _x(32), torch.tensor([0, 1])
    m = sparsify.sparsify(_model("resnet18"), recipe, total_steps=6, example_inputs=(x,))
    m.reset_classifier(5)
    ema = ModelEmaV3(m, decay=0.9)
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fc replaced after sparsify: said, tested above
        for i in range(2):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m)
            ema.update(m, step=i)
            sparsify.sync(ema, m)
    sizes = {k: v.shape for k, v in m.state_dict().items() if k.endswith("_extra_state")}
    assert sizes == {k: v.shape for k, v in ema.module.state_dict().items() if k.endswith("_extra_state")}


def test_swin_state_dict_stays_timms():
    """Swin's relative position index becomes a graph constant when traced: it is no state, so the
    sparse and finalized state_dicts hold timm's keys and the finalized one loads into timm's model."""
    kwargs = {"img_size": 64, "window_size": 2}
    dense = _model("swin_tiny_patch4_window7_224", **kwargs)
    x = _x(64)
    m = sparsify.sparsify(dense, "gmp", total_steps=10, example_inputs=(x,))
    assert not [k for k in m.state_dict() if "_tensor_constant" in k]
    constants = [n.target for n in m.graph.nodes if n.op == "get_attr" and "_tensor_constant" in n.target]
    assert constants and all(getattr(m.to("meta"), c).is_meta for c in constants)  # buffers: moved by .to()
    m = sparsify.sparsify(dense, "gmp", total_steps=10, example_inputs=(x,))
    final = sparsify.finalize(m, (x,))
    assert final.state_dict().keys() == dense.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(_reloaded("swin_tiny_patch4_window7_224", final, **kwargs)(x), final(x))
    # a pickled copy keeps them out too (torch before 2.14 rebuilt it with persistent buffers)
    for model in (m, final):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert torch.load(buf, weights_only=False).state_dict().keys() == model.state_dict().keys()


CASES = [
    # (model, recipe, least share of Conv/Linear weights rewritten)
    ("resnet10t", "sas", 0.9),  # relu rewiring through timm's blocks
    ("resnet10t", "nm-2-4", 0.9),
    ("efficientnet_b0", "tl1", 0.0),  # SiLU inside BatchNormAct2d: regularizers after each
    ("efficientnet_b0", "semi-structured", 0.01),  # masks before BatchNormAct2d
    ("lcnet_050", "str", 1.0),  # depthwise-separable, hard-swish
    ("convnext_atto", "dual", 1.0),
    ("levit_128s", "tl1", 0.0),  # eval-mode attention-bias cache: no trace may leave a proxy in it
]


@pytest.mark.parametrize("name,recipe,share", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_end_to_end_like_the_coverage_benchmark(name, recipe, share):
    """sparsify, a training step, report, finalize (output check) and a reload into a fresh
    timm model (benchmarks/timm_coverage.py's pipeline)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = coverage.run_one(name, recipe)
    assert rec["status"] == "ok", rec
    assert rec["param_share"] >= share
    assert rec["reload"] is (not recipe.startswith("sas"))
    if name == "efficientnet_b0" and recipe == "tl1":  # one regularizer per SiLU, those inside BatchNormAct2d too
        acts = sum(1 for mod in _model(name).modules() if isinstance(mod, torch.nn.SiLU))
        assert rec["rewritten"] == acts


def test_sas_head_reads_through_timms_global_pool():
    """timm's head pools with ``SelectAdaptivePool2d`` (adaptive_avg_pool2d then flatten, one module):
    SAS's head rule looks through it to the last relu, as through torchvision's avgpool + flatten."""
    plan = sparsify.plan(_model("resnet10t"), "sas", example_inputs=(_x(32),))
    assert {e.name: e.method for e in plan.entries}["fc"] == "sas"


@pytest.mark.parametrize("recipe", ["tl1", "semi-structured"])
def test_vit_activation_recipes_run_in_its_graph(recipe):
    """timm's ViT takes ``forward(x, attn_mask=None, is_causal=False)``. Its graph took both as
    inputs, so the call guard sent every call, ``m(x)`` included, to timm's own forward, without
    the inserted nodes: tl1's penalty was 0 and semi-structured masked nothing, for the whole run.
    The root is now traced as ``example_inputs`` call it (both at their defaults); a call that
    passes a mask runs timm's forward, and says so."""
    x = _x(32)
    m = sparsify.sparsify(_model("vit_tiny_patch16_224", img_size=32), recipe, total_steps=4, example_inputs=(x,))
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "called with arguments its graph was not traced for"
        for _ in range(4):
            out = m(x)
            penalty = sparsify.penalty(m)
            loss = out.square().mean() + penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m, loss.item())
    if recipe == "tl1":
        assert float(penalty) > 0
    else:
        assert sparsify.report(m).totals["achieved"]["output positions"] > 0.1
    with pytest.warns(UserWarning, match="its own forward runs"):
        masked = m(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))  # 4 patches and the class token
    assert masked.shape == out.shape


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_grad_checkpointing_on_before_sparsify_keeps_the_inserted_nodes(name):
    """timm's ``checkpoint_seq`` runs a Sequential's blocks one by one: a graph over the whole
    Sequential held tl1's nodes where those calls never look (ViT's penalty was 0, silently).
    A model that checkpoints is rewritten block by block, also where a submodule checkpoints
    (ConvNeXt's stages): the penalty and the gradients equal those without checkpointing."""
    kw = {"img_size": 32} if name.startswith("vit") else {}
    x = _x(32)
    runs = []
    for on in (False, True):
        net = _model(name, **kw).train()
        net.set_grad_checkpointing(on)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = sparsify.sparsify(net, "tl1", total_steps=4, example_inputs=(x,))
        out = m(x)
        penalty = sparsify.penalty(m)
        (out.square().mean() + penalty).backward()
        runs.append((float(penalty), {n: p.grad for n, p in m.named_parameters()}))
    (p0, g0), (p1, g1) = runs
    assert p0 > 0 and p1 == pytest.approx(p0, rel=1e-5)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-6) for k in g0)


@pytest.mark.parametrize("recipe", ["tl1", "semi-structured"])
def test_grad_checkpointing_turned_on_after_sparsify(recipe):
    """The graph holds the branch without checkpointing. Evaluation runs it (nothing to
    checkpoint there: the masks stay, and finalize deploys them); a training forward would
    have run timm's forward without the inserted nodes after one warning: it now refuses,
    saying how to checkpoint with them."""
    x = _x(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(_model("resnet18"), recipe, total_steps=4, example_inputs=(x,))
        if recipe == "semi-structured":  # masks in place
            m.train()
            for _ in range(4):
                loss = m(x).square().mean()
                loss.backward()
                sparsify.step(m, loss.item())
    m.eval()
    with torch.no_grad():
        ref = m(x)
        m.set_grad_checkpointing(True)
        assert torch.equal(m(x), ref)
        final = sparsify.finalize(m, (x,))
        assert torch.allclose(final(x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"set_grad_checkpointing\(True\)\) before|before sparsify"):
        m.train()(x)


def test_a_recipe_that_rewrites_nothing_says_so():
    """SAS on a ViT: every Linear reads a LayerNorm or GELU output, not a ReLU's, so SAS leaves
    all 50 matched sites dense; nothing said so, in sparsify, training, report or finalize."""
    x = _x(32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(_model("vit_tiny_patch16_224", img_size=32), "sas", total_steps=4, example_inputs=(x,))
    said = [str(w.message) for w in caught if "rewrote nothing" in str(w.message)]
    assert len(said) == 1 and "not a relu output" in said[0] and "sparsify.plan" in said[0]


@pytest.mark.parametrize("recipe", ["tl1", "semi-structured"])
def test_training_through_forward_features_is_told_as_such(recipe):
    """The loop trains the returned model through timm's forward_features / forward_head, which
    skip the inserted nodes: the warning said the loop trained another model (the one given to
    sparsify()), which it did not; it now names timm's methods first."""
    x, y = _x(32, n=4), torch.tensor([0, 1, 2, 3])
    model = sparsify.sparsify(_model("resnet18").train(), recipe, total_steps=4, example_inputs=x)
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = F.cross_entropy(model.forward_head(model.forward_features(x)), y)
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(model, loss.detach())
    said = [str(w.message) for w in caught if "no forward with gradients ran" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].split(": ", 2)[2].startswith("this model has forward_features: the loop calls methods other than "
                                                "forward (timm's forward_features / forward_head)"), said[0]
    assert "call model(x)" in said[0]
