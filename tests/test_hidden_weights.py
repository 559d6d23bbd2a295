"""Weights read outside a module call (Swin's get_attr, nn.MultiheadAttention) are sparsified by
weight methods, shown by plan/report, and finalized into plain modules."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import sparsify
from sparsify.prepare.hidden import SparseMultiheadAttention, effective_weight_of
from sparsify.methods import REGISTRY, SparseWeightMixin
from sparsify.core.layers import WEIGHT_TYPES


def tiny_vit():
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zero-inits the head: no gradient would flow
    return vit


def tiny_swin():
    # same blocks as swin_t (ShiftedWindowAttention, shifted windows, patch merging), fewer of them
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10)


def train(model, x, steps=3):
    opt = torch.optim.SGD(sparsify.param_groups(model), lr=0.05)
    for _ in range(steps):
        loss = model(x).logsumexp(1).mean() + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model)


def sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseWeightMixin)}


def test_plan_real_swin_t_reaches_attention_weights():
    p = sparsify.plan(torchvision.models.swin_t(), "st3", example_inputs=torch.zeros(1, 3, 64, 64))
    names = {e.name for e in p.rewritten}
    # 24 attention Linear layers that never appear as call_module are planned like the others
    assert {f"features.{s}.{b}.attn.{w}" for s, n in ((1, 2), (3, 2), (5, 6), (7, 2)) for b in range(n)
            for w in ("qkv", "proj")} <= names
    assert not p.dense
    assert p.shares()["param_share"] == 1.0
    qkv = next(e for e in p.rewritten if e.name == "features.1.0.attn.qkv")
    # 64/4 = 16x16 tokens at stage 1, padded to 21x21 for 7x7 windows (padding counts, as for convs)
    assert qkv.macs == 21 * 21 * 96 * 288


def test_plan_real_vit_b_16_reaches_multihead_attention():
    p = sparsify.plan(torchvision.models.vit_b_16(), "st3", example_inputs=torch.zeros(1, 3, 224, 224))
    rewritten = {e.name for e in p.rewritten}
    for i in range(12):
        base = f"encoder.layers.encoder_layer_{i}.self_attention"
        assert {f"{base}.in_proj", f"{base}.out_proj"} <= rewritten
    assert not p.dense
    in_proj = next(e for e in p.rewritten if e.name.endswith("encoder_layer_0.self_attention.in_proj"))
    assert in_proj.params == 768 * 3 * 768 and in_proj.macs == 197 * 768 * 3 * 768


def test_swin_get_attr_reads_become_effective_weights():
    torch.manual_seed(0)
    model = tiny_swin()
    x = torch.randn(2, 3, 32, 32)
    m = sparsify.sparsify(model, "st3", begin=0, end=2, fix=None, total_steps=10, example_inputs=x[:1])
    layers = sparse_layers(m)
    hidden = [n for n in layers if n.endswith(("attn.qkv", "attn.proj"))]
    assert len(hidden) == 8
    # the graph reads them through effective_weight_of, not as raw parameters
    reads = [n for gm in m.modules() if isinstance(gm, fx.GraphModule) for n in gm.graph.nodes
             if n.op == "call_function" and n.target is effective_weight_of]
    assert len(reads) == 8
    model.eval(), m.eval()
    with torch.no_grad():  # step 0: nothing pruned yet, same function as the dense model
        torch.testing.assert_close(m(x), model(x))
    m.train()
    train(m, x)
    qkv = m.get_submodule("features.1.0.attn.qkv")
    assert qkv.weight.grad is not None and qkv.weight.grad.abs().sum() > 0  # straight-through
    assert float((qkv.effective_weight() == 0).float().mean()) > 0.5
    rows = {r.name: r for r in sparsify.report(m).layers}
    assert rows["features.1.0.attn.qkv"].weight_sparsity > 0.5 and rows["features.1.0.attn.qkv"].macs
    final = sparsify.finalize(m, x[:1])  # raises unless outputs match
    assert not any(isinstance(mod, SparseWeightMixin) for mod in final.modules())
    for gm in final.modules():
        if isinstance(gm, fx.GraphModule):
            assert not any(n.target is effective_weight_of for n in gm.graph.nodes)
    w = final.get_submodule("features.1.0.attn.qkv").weight
    assert type(final.get_submodule("features.1.0.attn.qkv")) is nn.Linear
    torch.testing.assert_close(w, qkv.effective_weight().detach())
    # the deployed graph computes with the deployed weight: zeroing it changes the output
    with torch.no_grad():
        before = final(x)
        w.zero_()
        assert not torch.allclose(before, final(x))


def test_vit_multihead_attention_trains_sparse_and_finalizes_plain():
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    m = sparsify.sparsify(model, "st3", begin=0, end=2, fix=None, total_steps=10, example_inputs=x[:1])
    attn = m.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert isinstance(attn, SparseMultiheadAttention)
    assert isinstance(attn.in_proj, SparseWeightMixin) and isinstance(attn.out_proj, SparseWeightMixin)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj.weight" in m.state_dict()
    model.eval(), m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x))  # eval fast path of the dense model vs ours
    m.train()
    train(m, x)
    assert attn.in_proj.weight.grad is not None and attn.out_proj.weight.grad.abs().sum() > 0
    zeros = float((attn.in_proj_weight == 0).float().mean())  # the attribute reads the effective weight
    assert zeros > 0.3
    rows = {r.name: r for r in sparsify.report(m).layers}
    row = rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert row.params == 64 * 192 and abs(row.weight_sparsity - zeros) < 1e-6 and row.macs == 5 * 64 * 192
    final = sparsify.finalize(m, x[:1])
    fa = final.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    # torch's own class for it (NonDynamicallyQuantizableLinear: quantize_dynamic skips it)
    assert type(fa) is nn.MultiheadAttention and type(fa.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(fa.in_proj_weight, attn.in_proj_weight.detach())
    # a plain MultiheadAttention in eval uses torch's fast path: still equal (checked by finalize too)
    with torch.no_grad():
        torch.testing.assert_close(final(x), m.eval()(x), rtol=1e-4, atol=1e-5)


def test_sparse_mha_loads_dense_checkpoint_and_roundtrips():
    model = tiny_vit()
    m = sparsify.sparsify(model, "st3", begin=0, end=2, fix=None, total_steps=10,
                          example_inputs=torch.zeros(1, 3, 32, 32))
    dense_sd = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    missing, unexpected = m.load_state_dict(dense_sd, strict=False)
    assert not [k for k in missing if k.endswith(("weight", "bias"))] and not unexpected
    attn = m.get_submodule("encoder.layers.encoder_layer_1.self_attention")
    torch.testing.assert_close(attn.in_proj.weight, dense_sd["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"])
    m2 = sparsify.sparsify(tiny_vit(), "st3", begin=0, end=2, fix=None, total_steps=10,
                           example_inputs=torch.zeros(1, 3, 32, 32))
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.get_submodule("encoder.layers.encoder_layer_1.self_attention").in_proj.weight,
                               attn.in_proj.weight)


def test_mha_with_separate_kv_dims_is_rewritten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)

        def forward(self, q, kv):
            return self.attn(q, kv, kv)[0]
    p = sparsify.plan(Net(), "st3", example_inputs=(torch.zeros(1, 3, 8), torch.zeros(1, 5, 4)))
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"} <= {e.name for e in p.rewritten}


def _recipes_with_weight_methods():
    out = []
    for name in sorted(sparsify.builtin_recipes()):
        rules = sparsify.load_recipe(name).rules
        if any(r.method and REGISTRY[r.method].site == "module" and nn.Linear in REGISTRY[r.method].targets
               for r in rules):
            out.append(name)
    return out


@pytest.mark.parametrize("recipe", _recipes_with_weight_methods())
def test_every_weight_recipe_reaches_hidden_weights(recipe):
    """Generic over SparseWeightMixin: every built-in recipe with a weight method rewrites both
    patterns (or leaves them dense for a reason of its own, never for being hidden)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for model in (tiny_vit(), tiny_swin()):
        p = sparsify.plan(model, recipe, total_steps=6, example_inputs=x[:1])
        hidden_reasons = [e for e in p.dense if "outside a module call" in e.reason or "leaf" in e.reason]
        assert not hidden_reasons, hidden_reasons
        m = sparsify.sparsify(model, recipe, total_steps=6, example_inputs=x[:1])
        planned = {e.name for e in p.rewritten if e.name.endswith(("attn.qkv", "self_attention.in_proj"))}
        assert planned <= set(sparse_layers(m))
        train(m, x, steps=2)
        final = sparsify.finalize(m, x[:1])
        assert not any(isinstance(mod, (SparseWeightMixin, SparseMultiheadAttention)) for mod in final.modules())


class ReadsEmbWeight(nn.Module):
    """Reads a sparse layer's weight directly: the graph computes with effective_weight_of(emb)."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.emb(x))
        return self.out(h) + nn.functional.linear(h, self.emb.weight.t())


@pytest.mark.parametrize("recipe", ["gmp", "st3"])
@pytest.mark.filterwarnings("ignore:sparsify.step:UserWarning")  # four steps prune `out` whole rows
def test_a_pickled_model_reading_a_weight_loads_and_computes_the_same(recipe):
    """torch.load traces a pickled graph's code again: effective_weight_of stays one call node."""
    import io
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    m = sparsify.sparsify(ReadsEmbWeight(), recipe, total_steps=4, example_inputs=x)
    train(m, x, steps=2)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    called = [n for n in loaded.graph.nodes if n.target is effective_weight_of]
    assert [n.args[0].target for n in called] == ["emb"]
    m.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), m(x))
