"""Hooks on the model's modules (docs/hooks.md): a graph runs the code of the
modules it was traced through without calling them, so before, a forward hook on a block
(``model.layer2``, the usual way to take features for distillation or Grad-CAM) and on the model
itself never ran in the sparse model, silently. Now a module carrying hooks when ``sparsify`` runs
keeps its call, the model's own hooks carry over, the caller's hook objects run (not copies), a
hook registered later on a module whose code a graph runs warns, and ``finalize`` makes such a
module called again where it gives a module its own forward back."""
from __future__ import annotations

import copy
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
import torchvision

import sparsify
from passes.hooks import InlinedHooks

RECIPES = sorted(sparsify.builtin_recipes())
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Record:
    """A hook object that keeps what it saw: the pattern of feature-taking code."""

    def __init__(self):
        self.outputs = []

    def __call__(self, module, args, out):
        self.outputs.append(out.detach().clone())


def build(recipe, hooked=()):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    records = {}
    for path in hooked:
        records[path] = Record()
        (net.get_submodule(path) if path else net).register_forward_hook(records[path])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracing summary, schedules at step 0
        model = sparsify.sparsify(net, recipe, example_inputs=(X,), total_steps=20)
    for r in records.values():
        r.outputs.clear()  # sparsify's own example forward
    return model, records


def train(model, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(X).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model)


@pytest.mark.parametrize("recipe", RECIPES)
def test_hooks_registered_before_sparsify_run_in_the_sparse_model(recipe):
    model, records = build(recipe, hooked=("layer2", "layer3.1", ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model)
    assert [len(records[p].outputs) for p in ("layer2", "layer3.1", "")] == [2, 2, 2]
    out = model(X)
    assert torch.equal(records[""].outputs[-1], out.detach())  # the root's hook saw the model's output
    assert records["layer2"].outputs[-1].shape == (2, 128, 4, 4)
    if recipe.startswith("sas"):
        return  # SAS rewires a relu into the next layer: the stem's modules called one by one are not its graph
    # the block's hook sees what the block computes in the sparse model
    assert torch.equal(records["layer3.1"].outputs[-1], model.layer3[1](model.layer3[0](
        model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(X)))))))).detach())


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - {"sas", "sas-m4"}))
def test_a_kept_call_computes_what_the_graph_did(recipe):
    # the boundary changes no computation: same outputs, hook or not, after training steps
    outs = []
    for hooked in ((), ("layer2",)):
        model, _ = build(recipe, hooked)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(model)
        outs.append(model.eval()(X).detach())
    assert torch.equal(outs[0], outs[1])


def test_sas_says_what_a_kept_call_stops():
    # SAS widens a relu's output into the next conv: not across a call kept for its hooks, and the
    # plan says so
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.layer2.register_forward_hook(lambda *a: None)
    plan = sparsify.plan(net, "sas", example_inputs=(X,))
    assert any(n.startswith("layer2 keeps its own call") for n in plan.capture_notes)
    entry = next(e for e in plan.entries if e.name == "layer3.0.conv1")
    assert entry.method is None and "layer2" in entry.reason
    assert "layer2 keeps its own call" in str(plan)


def test_the_callers_hook_object_runs_and_copies_keep_their_own():
    model, records = build("gmp", hooked=("layer2",))
    model(X)
    assert len(records["layer2"].outputs) == 1  # the caller's object, not a copy made with the model
    # an EMA copy, a checkpoint: as for any torch module, the copy holds a copy of each hook, which runs
    for dup in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        dup(X)
        assert len(records["layer2"].outputs) == 1
        assert [len(h.outputs) for h in dup.layer2._forward_hooks.values()] == [2]  # the one copied, and this call


def test_a_backward_hook_on_a_block_runs():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    grads = []
    net.layer4.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(net, "st3", example_inputs=(X,), total_steps=20)
    model(X).sum().backward()
    assert grads == [(2, 512, 1, 1)]


def test_a_hook_registered_later_on_an_inlined_module_warns_once_at_the_next_call():
    model, _ = build("gmp", hooked=("layer2",))
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.layer2.register_forward_hook(lambda *a: seen.append("kept"))  # kept call: runs, quiet
        model.layer3[0].register_forward_hook(lambda *a: seen.append("inlined"))
        model.layer4.register_forward_pre_hook(lambda *a: seen.append("inlined"))
        model.layer1[0].conv1.register_forward_hook(lambda *a: seen.append("layer"))  # a called layer
        assert caught == []  # said at the call, where the hook fails to run
        model(X)
        model(X)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "`layer3.0` does not run" in messages[0], messages
    assert seen == ["layer", "kept"] * 2


def test_hooks_registered_and_removed_unused_are_quiet():
    # Lightning's model summary and torchinfo register a hook on every module, then remove them
    model, _ = build("st3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handles = [m.register_forward_hook(lambda *a: None) for m in model.modules()]
        for h in handles:
            h.remove()
        model(X)
    assert [str(w.message) for w in caught if "does not run" in str(w.message)] == []


def test_guards_survive_copies_and_leave_with_finalize():
    model, _ = build("gmp")
    for dup in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(dup.layer2[0]._forward_hooks, InlinedHooks)
        dup.layer2[0].register_forward_hook(Record())
        with pytest.warns(UserWarning, match="does not run"):
            dup(X)
    seen = Record()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.layer2[0].register_forward_hook(seen)
        final = sparsify.finalize(model)
    seen.outputs.clear()  # finalize's own check
    assert type(final) is torchvision.models.ResNet  # its own forward: every block called again
    assert not [m for m in final.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
                if isinstance(d, InlinedHooks)]
    final(X)
    assert len(seen.outputs) == 1 and isinstance(final.layer2[0]._forward_hooks, OrderedDict)


def test_graphs_finalize_keeps_still_warn():
    # SAS's finalized graph still runs the blocks' code: hooks registered there keep warning
    model, _ = build("sas")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(model)
    final.layer2[0].register_forward_hook(Record())
    with pytest.warns(UserWarning, match="does not run"):
        final(X)


def test_transformers_block_hooks_run_with_keyword_inputs():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_labels=3)
    torch.manual_seed(0)
    net = transformers.BertForSequenceClassification(cfg)
    ids, labels = torch.randint(0, 100, (2, 8)), torch.tensor([0, 2])
    forward, backward = [], []
    net.bert.encoder.layer[0].register_forward_hook(lambda m, i, o: forward.append(1))
    net.bert.encoder.layer[1].output.register_full_backward_hook(lambda m, gi, go: backward.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(net, "st3-sigma", example_inputs={"input_ids": ids, "labels": labels},
                                  total_steps=10)
    forward.clear()
    model(input_ids=ids, labels=labels).loss.backward()
    assert (len(forward), len(backward)) == (1, 1)


@pytest.mark.parametrize("feature_cls", ["hook", None])
@pytest.mark.parametrize("recipe", ["gmp", "st3-sigma", "sas"])
def test_timm_feature_models_return_their_features(recipe, feature_cls):
    # timm's features_only=True, feature_cls="hook" (FeatureHookNet) collects the features with forward
    # hooks on its stages into an object it holds: before, the sparse model returned an empty list
    # (the stages' code ran inline) and finalize failed on proxies its trace had left in that object
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[dev]')")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    extra = {"feature_cls": feature_cls} if feature_cls else {}
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, features_only=True, **extra)
    dense = [f.detach() for f in net(x)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(net, recipe, example_inputs=(x,), total_steps=10, copy=True)
        feats = model(x)
        if recipe == "gmp":  # sparsity 0 at step 0: the dense model's features
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(feats, dense))
        sum(f.mean() for f in feats).backward()
        sparsify.step(model)
        final = sparsify.finalize(model)
    assert [tuple(f.shape) for f in feats] == [tuple(f.shape) for f in dense] == [
        (2, 64, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert len(final(x)) == 5


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "swin_t", "densenet121", "googlenet"])
def test_zoo_block_hooks_fire_as_in_the_dense_model(name):
    # a hook on every block down to depth 2: each one the dense model calls fires in the sparse model,
    # which computes what it computes without the hooks
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}

    def run(hooked):
        torch.manual_seed(0)
        net = torchvision.models.get_model(name, weights=None, **extra).eval()
        fired = set()
        for path, mod in net.named_modules() if hooked else ():
            if path and path.count(".") <= 1 and not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.register_forward_hook(lambda m, i, o, path=path: fired.add(path))
        with torch.no_grad():
            net(x)
        dense_fired, _ = set(fired), fired.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = sparsify.sparsify(net, "gmp", example_inputs=(x,), total_steps=10).eval()
        fired.clear()
        with torch.no_grad():
            return model(x), dense_fired, fired
    plain, _, _ = run(False)
    out, dense_fired, fired = run(True)
    assert len(dense_fired) >= 5 and fired == dense_fired
    assert torch.allclose(out, plain, atol=1e-6)


def test_a_kept_call_keeps_the_checkpoint_keys():
    # a checkpoint of a model sparsified with hooks on its blocks loads into one sparsified without
    plain, _ = build("st3")
    hooked, _ = build("st3", hooked=("layer2", "layer3.0"))
    assert list(hooked.state_dict()) == list(plain.state_dict())
    assert not plain.load_state_dict(hooked.state_dict()).missing_keys


def test_the_export_capture_says_that_a_blocks_hooks_do_not_run():
    # torch.export runs a hook once while it captures (on fake tensors) and inlines the block: the
    # model's first call says so (the fx capture keeps the call: see the tests above)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    seen = []
    net.layer2.register_forward_hook(lambda *a: seen.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(net, "st3-sigma", example_inputs=(X,), total_steps=10, capture="export")
    seen.clear()
    with pytest.warns(UserWarning, match="a hook registered on `layer2` does not run"):
        model(X)
    assert seen == []


@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_hooks_registered_later_on_called_modules_run_and_stay_quiet(recipe):
    # what measure(), torchinfo and feature code do after sparsify: hook the modules the graph
    # calls. semi-structured's masks, inserted after a conv, copied its module stack and made the
    # conv look inlined: every such hook warned (the demo printed it), though each ran
    model, _ = build(recipe)
    called = {f"{prefix}.{n.target}".lstrip(".") for prefix, gm in model.named_modules()
              if isinstance(gm, torch.fx.GraphModule) for n in gm.graph.nodes if n.op == "call_module"}
    counts = dict.fromkeys(called, 0)
    for path in called:
        model.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: counts.__setitem__(p, counts[p] + 1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(X)
    assert [p for p, n in counts.items() if n == 0] == []
    assert not [w for w in seen if "a hook registered on" in str(w.message)]


@pytest.mark.parametrize("recipe", ["st3", "gmp", "str", "nm-2-4", "dual", "semi-structured", "tl1"])
def test_hooks_on_sparsified_layers_run_after_finalize(recipe):
    """finalize's plain layers carry the hooks of the sparse layers they replace: a pre-hook that
    changes the input (with kwargs too), a forward hook that changes the output, one that records
    it and a backward hook all run, and the finalized model computes what the sparse one did.
    The plain layers were built without hooks."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 12 * 12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x = torch.randn(4, 3, 16, 16)
    seen, grads = Record(), []
    net[3].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    net[3].register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] + 0.5,), kwargs), with_kwargs=True)
    net[6].register_forward_hook(lambda mod, args, out: out + 1.0)
    net[6].register_forward_hook(seen)
    net[6].register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(net, recipe, example_inputs=(x,), total_steps=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(4):
            loss = model(x).square().mean() + sparsify.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(model)
        with torch.no_grad():
            expected = model.eval()(x)
        expected_seen = seen.outputs[-1]
        final = sparsify.finalize(model)
    seen.outputs.clear()
    grads.clear()
    out = final(x)
    torch.testing.assert_close(out, expected)
    assert len(seen.outputs) == 1
    torch.testing.assert_close(seen.outputs[0], expected_seen)
    out.sum().backward()
    assert grads == [(4, 32)]


def _sas_with_hook_warnings(net, x):
    """``sparsify(net, "sas")`` and the warnings it gave about layers left dense for hooks."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(net, "sas", example_inputs=(x,), total_steps=4)
    return m, [str(w.message) for w in caught if "left dense for the hooks registered on" in str(w.message)]


def _relu_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(16 * 12 * 12, 10))


@pytest.mark.parametrize("hook", ["relu forward", "relu pre", "relu backward", "conv pre", "conv backward"])
def test_sas_leaves_dense_a_layer_whose_rewiring_would_change_hooks(hook):
    """SAS rewires the conv after a relu to read the relu's input: a hook on that relu would be
    bypassed (and a folded relu's dropped), a pre-hook on the conv would see another input. Such a
    conv stays dense, with a warning naming the hook; the model computes what it did (the
    pre-hook's conv got the relu's input plus one, silently)."""
    net = _relu_net()
    if hook == "relu forward":
        net[1].register_forward_hook(lambda mod, args, out: out * 0.5)
    elif hook == "relu pre":
        net[1].register_forward_pre_hook(lambda mod, args: (args[0] - 0.1,))
    elif hook == "relu backward":
        net[1].register_full_backward_hook(lambda mod, gin, gout: None)
    elif hook == "conv pre":
        net[2].register_forward_pre_hook(lambda mod, args: (args[0] + 1.0,))
    else:
        net[2].register_full_backward_hook(lambda mod, gin, gout: None)
    x = torch.randn(2, 3, 16, 16)
    expected = net(x)
    m, said = _sas_with_hook_warnings(net, x)
    assert len(said) == 1 and ("relu 1" if hook.startswith("relu") else "on it (") in said[0], said
    assert type(m[2]) is torch.nn.Conv2d and type(m[5]).__name__ == "SASLinear"
    torch.testing.assert_close(m.eval()(x), expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(sparsify.finalize(m)(x), expected, rtol=1e-5, atol=1e-5)


def test_sas_leaves_dense_a_layer_behind_a_hooked_op_after_the_relu():
    """A hook on an op SAS looks through (the Flatten between the relu and the Linear) would be
    bypassed too: that Linear stays dense, named with the op."""
    net = _relu_net()
    net[4].register_forward_hook(lambda mod, args, out: out * 0.5)
    x = torch.randn(2, 3, 16, 16)
    expected = net(x)
    m, said = _sas_with_hook_warnings(net, x)
    assert len(said) == 1 and "op 4 (forward hook)" in said[0], said
    assert type(m[5]) is torch.nn.Linear and type(m[2]).__name__ == "SASConv2d"
    torch.testing.assert_close(m.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_a_forward_hook_on_a_sas_layer_runs_after_finalize():
    """A forward hook on the rewired conv sees its output, the same before and after: SAS takes
    the layer and its deployed module carries the hook."""
    net = _relu_net()
    net[2].register_forward_hook(lambda mod, args, out: out + 1.0)
    x = torch.randn(2, 3, 16, 16)
    expected = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(net, "sas", example_inputs=(x,), total_steps=4)
        final = sparsify.finalize(m)
    assert type(m[2]).__name__ == "SASConv2d"
    torch.testing.assert_close(final(x), expected, rtol=1e-5, atol=1e-5)


def test_always_called_and_state_dict_hooks_reach_the_finalized_layer():
    """The other hook dictionaries finalize's plain layer takes: a forward hook registered with
    always_call=True runs, and a state_dict post-hook still shapes the layer's entries."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    calls = []
    net[2].register_forward_hook(lambda mod, args, out: calls.append(1), always_call=True)

    def tag(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "tagged"] = torch.ones(1)
    net[2]._register_state_dict_hook(tag)
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(sparsify.sparsify(net, "gmp", example_inputs=(x,), total_steps=4))
    calls.clear()
    final(x)
    assert calls == [1] and "2.tagged" in final.state_dict()
