"""SAS on real torchvision models: the relu rewiring, the official ResNet-18 conversion and its
dataflow, dense-equivalent initialisation, report, finalize/export, state_dict."""
from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from sparsify.methods.sas import SASMixin, is_relu
from sparsify.core.state import find_state

from test_sas import official_conv, official_linear

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X32 = X64[:, :, ::2, ::2].contiguous()  # the smallest input every model here accepts; keeps the suite fast


def _sas_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SASMixin)}


def _randomize_bn(model, seed=0):
    """BN statistics away from (0, 1) so eval-mode comparisons are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def _close(a, b, tol=1e-4):
    scale = max(1.0, float(a.abs().max()))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


# ---- the official ResNet-18 conversion --------------------------------------------------------

class _OfficialSAS(nn.Module):
    """The official SASConv2d / SASLinear forward: interleaved zeros tensor + one wide layer."""

    def __init__(self, layer, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = layer.bias
        self.kw = {} if isinstance(layer, nn.Linear) else dict(
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)

    def forward(self, x):
        if x.dim() == 2:
            return official_linear(x, self.weight, self.bias)
        return official_conv(x, self.weight, self.bias, **self.kw)


def _official_resnet18(dense):
    """convert_sas.py applied to the official resnet18_model.py, written against torchvision's
    modules: every conv but the 3-channel stem and the fc become SAS (random wide weights here), every
    ReLU becomes Identity, and BasicBlock's `identity` Identity becomes a ReLU (so the shortcut and
    the downsample read relu(x))."""
    model = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(3)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and not (isinstance(mod, nn.Conv2d) and mod.in_channels == 3):
            wide = torch.randn(mod.weight.shape[0], 2 * mod.weight.shape[1], *mod.weight.shape[2:], generator=g)
            wide *= mod.weight.detach().std()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, _OfficialSAS(mod, wide))

    def forward(x):
        x = model.maxpool(model.bn1(model.conv1(x)))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for blk in layer:
                identity = F.relu(x)
                out = blk.bn2(blk.conv2(blk.bn1(blk.conv1(x))))
                if blk.downsample is not None:
                    identity = blk.downsample(identity)
                x = out + identity
        return model.fc(torch.flatten(model.avgpool(x), 1))
    return model, forward


def test_builtin_sas_is_the_official_resnet18_conversion():
    plan = sparsify.plan(torchvision.models.resnet18(), "sas", example_inputs=X32)
    sas = [e for e in plan.rewritten if e.method == "sas"]
    assert sorted(e.kind for e in sas).count("Conv2d") == 19 and [e.name for e in sas if e.kind == "Linear"] == ["fc"]
    assert [e.name for e in plan.dense] == ["conv1"]
    model = sparsify.sparsify(torchvision.models.resnet18(), "sas", example_inputs=X32)
    assert sum(p.numel() for p in model.parameters()) == 23_359_016  # README: 23.36 M (dense 11.69 M)


def test_official_state_dict_gives_official_outputs():
    torch.manual_seed(0)
    dense = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    official, official_forward = _official_resnet18(dense)
    ours = sparsify.sparsify(dense, "sas", example_inputs=X64)
    missing, unexpected = ours.load_state_dict(official.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("sparsify_state.") for k in missing)
    for train in (True, False):
        official.train(train)
        ours.train(train)
        x = X64.clone().requires_grad_(True)  # 64x64: train-mode BN over 2x2 maps is well conditioned
        ref = official_forward(x)
        ref.square().sum().backward()
        ref_grad, ref_wgrad = x.grad, official.layer2[0].conv1.weight.grad
        x.grad = None
        out = ours(x)
        out.square().sum().backward()
        _close(out, ref)
        _close(x.grad, ref_grad)
        _close(ours.layer2[0].conv1.weight.grad, ref_wgrad)
        official.zero_grad()
        ours.zero_grad()


def test_resnet18_graph_after_rewiring():
    model = sparsify.sparsify(torchvision.models.resnet18(), "sas", example_inputs=X32)
    graph = model.graph
    layers = _sas_layers(model)
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layers:
            src = node.args[0]
            if "downsample" in node.target:  # converted as is: reads relu(x) like the official code
                assert is_relu(model, src)
            else:
                assert not is_relu(model, src), node.target
    for node in graph.nodes:  # every relu left is out of place: SAS layers read its input unmutated
        if is_relu(model, node):
            assert node.op == "call_function" and node.target is torch.relu
    # the stem relu moved past the max-pool: layer1.0.conv1 reads maxpool(bn1(conv1(x)))
    conv = next(n for n in graph.nodes if n.target == "layer1.0.conv1")
    assert conv.args[0].target == "maxpool" and conv.args[0].args[0].target == "bn1"
    assert "rewired from relu" in layers["layer1.0.conv1"].sas_input
    assert layers["layer2.0.downsample.0"].sas_input.startswith("as is (input is a relu output)")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fresh_conversion_reproduces_dense_features_and_outputs(name):
    torch.manual_seed(1)
    x = X32[:1] if name == "resnet50" else X64
    dense = _randomize_bn(getattr(torchvision.models, name)()).eval()
    feats = {}
    hook = dense.avgpool.register_forward_hook(lambda m, i, o: feats.__setitem__("dense", i[0]))
    with torch.no_grad():
        ref = dense(x)
    hook.remove()
    sas = sparsify.sparsify(dense, "sas", example_inputs=x).eval()
    sas.avgpool.register_forward_hook(lambda m, i, o: feats.__setitem__("sas", i[0]))
    with torch.no_grad():
        out = sas(x)
    # the official head reads the pre-activation: its relu is the dense features
    _close(feats["sas"].relu(), feats["dense"])
    assert (feats["sas"] < 0).any()
    assert not torch.allclose(out, ref)
    # with the head on relu features (through_average=false) the logits are the dense ones too
    same = sparsify.sparsify(dense, "sas", example_inputs=x, through_average=False).eval()
    with torch.no_grad():
        _close(same(x), ref)
    assert len(_sas_layers(same)) == len(_sas_layers(sas)) - 1


def test_training_reaches_the_negative_half():
    model = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "sas", example_inputs=X32)
    F.cross_entropy(model(X32), torch.tensor([1, 2])).backward()
    rewired, ds = model.layer2[1].conv1.weight.grad, model.layer2[0].downsample[0].weight.grad
    assert rewired[:, 1::2].abs().sum() > 0 and rewired[:, 0::2].abs().sum() > 0
    assert ds[:, 1::2].abs().sum() == 0  # relu(-relu(x)) = 0: the as-is shortcut's negative half is idle
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.1)
    opt.step()
    sparsify.step(model)
    assert model.layer2[1].conv1.weight[:, 1::2].abs().sum() > 0


def test_report_counts_nonzero_and_executed_macs():
    model = sparsify.sparsify(torchvision.models.resnet18(), "sas", example_inputs=X32)
    dense_macs = sparsify.stats.macs.dense_macs(torchvision.models.resnet18(), (X32,))
    rep = sparsify.report(model)
    t = rep.totals
    assert t["macs"] == t["nonzero_macs"] == dense_macs and t["mac_reduction"] == 0
    sas_rows = [r for r in rep.layers if r.method == "sas"]
    assert len(sas_rows) == 20
    for r in sas_rows:
        assert r.extra["executed_macs"] == 2 * r.macs and r.params == 2 * r.nonzero_params
        assert r.extra["activation_sparsity"] == 0.5
    stem = 64 * 3 * 49 * 16 * 16  # the dense stem: 16x16 output positions at 32x32
    assert t["executed_macs"] == 2 * dense_macs - stem
    text = str(rep)
    assert "executed MACs" in text and f"{t['executed_macs']:,}" in text
    assert rep.to_dict()["layers"][0]["extra"]["input"]


def test_sas_m4_on_resnet18():
    torch.manual_seed(2)
    dense = _randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    model = sparsify.sparsify(dense, "sas-m4", example_inputs=X32, through_average=False).eval()
    layer = model.layer1[0].conv1
    assert layer.sas_m == 4 and layer.weight.shape == (64, 256, 3, 3)
    with torch.no_grad():
        _close(model(X32), dense(X32))
    rep = sparsify.report(model)
    row = next(r for r in rep.layers if r.name == "layer1.0.conv1")
    assert row.extra["executed_macs"] == 4 * row.macs and row.extra["activation_sparsity"] == 0.75
    model.train()
    model(X32).sum().backward()
    assert all(w.grad.reshape(w.shape[0], -1, 4, *w.shape[2:])[:, :, 2:].abs().sum() > 0
               for w in (model.layer3[1].conv2.weight,))


@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_x_400mf", "densenet121"])
def test_other_torchvision_models(name):
    torch.manual_seed(3)
    dense = _randomize_bn(getattr(torchvision.models, name)(num_classes=10)).eval()
    x = X32[:1]
    with torch.no_grad():
        ref = dense(x)
    # mobilenet_v2 has ReLU6 only: nothing is fed by a relu, so convert as is (identity init)
    kw = {"not_relu": "as_is"} if name == "mobilenet_v2" else {}
    # no downsample in these models: the recipe marks that rule optional, so no warning
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = sparsify.sparsify(dense, "sas", example_inputs=x, through_average=False, **kw).eval()
    assert not [w for w in record if "matched nothing" in str(w.message)]
    assert find_state(model).plan.unmatched_rules == [2]
    layers = _sas_layers(model)
    convs = [m for m in dense.modules() if isinstance(m, nn.Conv2d)]
    # every conv but the stem; the head reads average-pooled features (left dense) but in mobilenet_v2
    assert len(layers) == len(convs) - 1 + (name == "mobilenet_v2")
    if name == "regnet_x_400mf":
        assert any(getattr(m, "groups", 1) > 1 for m in layers.values())
    if name == "mobilenet_v2":
        assert sum(getattr(m, "groups", 1) == getattr(m, "in_channels", 0) for m in layers.values()) == 17
        assert all(m.sas_input == "as is" for m in layers.values())
    with torch.no_grad():
        _close(model(x), ref)
    model.train()
    model(torch.cat([x, x.flip(-1)])).logsumexp(1).sum().backward()
    assert all(m.weight.grad is not None for m in layers.values())


def test_densenet_relu_inplace_functional_and_concat_inputs():
    model = sparsify.sparsify(torchvision.models.densenet121(num_classes=10), "sas", example_inputs=X32[:1])
    graph = model.graph
    head = next(n for n in graph.nodes if n.target == "classifier")
    chain = [head.args[0].target, head.args[0].args[0].target]
    assert "adaptive_avg_pool2d" in str(chain[1]) and head.args[0].args[0].args[0].target == "features.norm5"
    # dense-block layers read the BN of the concatenated features directly
    conv = next(n for n in graph.nodes if n.target == "features.denseblock2.denselayer3.conv1")
    assert conv.args[0].target == "features.denseblock2.denselayer3.norm1"
    assert conv.args[0].args[0].target is torch.cat


class _InplaceToy(nn.Module):
    """An in-place relu whose input is read again after it (and so sees the relu'd values)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = self.bn(x)
        torch.relu_(y)
        z = self.conv(y) + y * 2  # both read relu(y): the first through the graph edge to bn
        h = F.relu(z, inplace=True)
        f = self.fc(torch.flatten(self.pool(h), 1))
        return self.head(f) + h.mean()


def test_inplace_relus_keep_their_meaning():
    torch.manual_seed(4)
    toy = _InplaceToy()
    x = torch.randn(2, 4, 8, 8)
    ref = toy(x.clone())
    model = sparsify.sparsify(toy, {"version": 1, "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "method": "sas"}]},
                              example_inputs=x)
    assert set(_sas_layers(model)) == {"fc"}  # conv reads bn (relu_ result unused), head is not fed by a relu
    assert "through" in model.fc.sas_input
    _close(model(x.clone()), ref)
    final = sparsify.finalize(model)
    _close(final(x.clone()), model.eval()(x.clone()))
    exported = torch.export.export(final.eval(), (x,))
    _close(exported.module()(x.clone()), final(x.clone()))


def test_finalize_export_and_state_dict_roundtrip():
    torch.manual_seed(5)
    dense = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    model = sparsify.sparsify(dense, "sas", example_inputs=X32[:1])
    with torch.no_grad():
        for m in _sas_layers(model).values():
            m.weight.add_(torch.randn_like(m.weight) * 0.01)  # trained: both halves non-zero
    final = sparsify.finalize(model)  # raises if the plain model differs from the SAS one
    assert not any(isinstance(m, SASMixin) for m in final.modules())
    assert final.layer1[0].conv1.weight.shape == (64, 128, 3, 3)
    ops = {n.target for m in final.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
           if n.op == "call_function"}
    assert {torch.relu, torch.neg, torch.stack, F.conv2d, F.linear} <= ops
    exported = torch.export.export(final, (X32[:1],))
    _close(exported.module()(X32[:1]), final(X32[:1]))

    again = sparsify.sparsify(dense, "sas", example_inputs=X32[:1])
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(again(X32), model(X32))


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 4)

    def forward(self, h):
        return self.dense(h)


class _UntracedBlock(nn.Module):
    """torch.fx cannot trace its forward (a branch on a value), so its relu and its child's Linear
    land in different graphs, as BERT's intermediate act and output.dense do."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(8, 16), nn.ReLU(), _Head()

    def forward(self, x):
        if x.sum() > 1e9:
            x = x / 2
        return self.head(self.act(self.fc(x)))


def test_a_layer_whose_input_comes_from_another_graph_is_not_said_to_follow_no_relu():
    """BERT with hidden_act='relu': output.dense reads the relu's output, but torch.fx traced
    BertOutput apart; the plan said "input hidden_states is not a relu output" and suggested
    not_relu='as_is', which would convert a relu'd input."""
    reasons = {e.name: e.reason for e in sparsify.plan(_UntracedBlock(), "sas", example_inputs=torch.randn(2, 8)).dense}
    assert reasons["head.dense"].startswith("sas: input h is an argument of head, traced apart from the code that "
                                            "computes it"), reasons
    assert "is not a relu output" not in reasons["head.dense"]


def test_plan_says_why_layers_stay_dense_and_bad_params():
    plan = sparsify.plan(torchvision.models.mobilenet_v2(), "sas", example_inputs=X32[:1])
    assert len(plan.entries) == len({e.name for e in plan.entries})
    reasons = {e.name: e.reason for e in plan.dense}
    assert "is not a relu output" in reasons["features.2.conv.0.0"]
    with pytest.raises(sparsify.prepare.recipe.RecipeError, match=r"params.m: must be an integer >= 2"):
        sparsify.plan(torchvision.models.resnet18(), "sas", m=1)
    with pytest.raises(sparsify.prepare.recipe.RecipeError, match=r"params.slot_rule: slot rule 'sign' has exactly 2"):
        sparsify.plan(torchvision.models.resnet18(), "sas", m=3, slot_rule="sign")
    with pytest.raises(sparsify.prepare.recipe.RecipeError, match=r"params.not_relu: must be one of"):
        sparsify.plan(torchvision.models.resnet18(), "sas", not_relu="keep")


def test_stochastic_depth_stays_live_under_sas():
    # SAS traces through every module holding a layer or an activation, but a module with neither
    # (StochasticDepth) stays a leaf: eval() must switch it off, so eval outputs are deterministic
    model = sparsify.sparsify(torchvision.models.efficientnet_b0(num_classes=10), "sas",
                              example_inputs=X32[:1], not_relu="as_is")
    assert any(type(m).__name__ == "StochasticDepth" for m in model.modules())
    assert _sas_layers(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X32[:2]), model(X32[:2]))
    sparsify.finalize(model)  # raises when the check sees random eval outputs


def test_sas_looks_through_a_regularizer_on_its_relu():
    """A recipe with SAS and tl1: the regularizer after each relu does not hide the relu from SAS,
    plan and sparsify agree, and the regularizer still sees the relu's output."""
    recipe = {"version": 1, "name": "sas+tl1", "rules": [
        {"match": {"type": ["Conv2d", "Linear"]}, "method": "sas", "params": {"not_relu": "dense"}},
        {"match": {"type": ["ReLU"]}, "method": "tl1", "params": {"lam": 1e-3}}]}
    model = torchvision.models.resnet18(num_classes=10)
    plan = sparsify.plan(model, recipe, example_inputs=X32)
    planned = {e.name for e in plan.entries if e.method == "sas"}
    sparse = sparsify.sparsify(model, recipe, example_inputs=X32)
    assert planned and planned == set(_sas_layers(sparse))
    sparse.train()
    sparse(X32)
    assert float(sparsify.penalty(sparse)) > 0


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.squash, self.fc, self.side = nn.Linear(4, 8), nn.Sequential(nn.Tanh()), nn.Linear(8, 2), nn.Linear(4, 2)

    def forward(self, x, y):
        return self.fc(self.squash(self.stem(x))) + self.side(y)


class _UntracedRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Linear(4, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.mid(torch.relu(self.stem(x)))
        return h / 2 if h.sum() > 1e9 else h  # a branch on a value: torch.fx cannot trace the root


def test_the_plan_names_a_layers_input_as_the_model_does():
    """The plan said "sas: input _0 is not a relu output" (torch.fx's name of the node feeding the layer)
    and "input unknown ...; not_relu='as_is' converts it as is" where every other reason says "would
    convert": the feeding module by its qualified name, the model's input by its argument."""
    every_linear = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "sas"}]}
    plan = sparsify.plan(_TwoInputs(), every_linear, example_inputs=(torch.randn(2, 4), torch.randn(2, 4)))
    reasons = {e.name: e.reason for e in plan.dense}
    would = "not a relu output (not_relu='as_is' would convert it as is)"
    assert reasons == {"stem": f"sas: its input is the model's input 'x', {would}",
                       "fc": f"sas: its input, the output of squash.0 (Tanh), is {would}",
                       "side": f"sas: its input is the model's input 'y', {would}"}, reasons
    reasons = {e.name: e.reason for e in sparsify.plan(_UntracedRoot(), every_linear,
                                                       example_inputs=torch.randn(2, 4)).dense}
    assert reasons["mid"] == "sas: input unknown (layer outside a traced graph); not_relu='as_is' would convert it as is"
