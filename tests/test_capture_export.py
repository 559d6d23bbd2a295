"""The torch.export capture path (docs/capture.md): a model torch.fx cannot trace, and a torchvision
model both ways; outputs at sparsity 0, training, finalize, state_dict, plan, the capture option."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsify
from passes import ExportCaptureError, export_trace


class ShapeBranchNet(nn.Module):
    """torch.fx cannot trace it (a Python branch on a shape); torch.export can. Its functional relu
    and dropout sit in the untraceable forward itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if y.shape[-1] > 4:
            y = F.max_pool2d(y, 2)
        y = F.dropout(y.mean((2, 3)), 0.1, training=self.training)
        return self.fc(self.drop(y))


def _x(batch=2, size=8):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch * 100 + size))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _train(model, steps=3, size=8):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(steps):
        loss = model(_x(4, size) + i).square().mean() + sparsify.penalty(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(model)


def test_fx_cannot_trace_the_net_and_export_reaches_its_functional_relu():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(ShapeBranchNet())
    net = ShapeBranchNet()
    fx_plan = sparsify.plan(net, "tl1", example_inputs=_x(), capture="fx")
    ex_plan = sparsify.plan(net, "tl1", example_inputs=_x(), capture="export")
    assert [c["capture"] for c in fx_plan.captures] == ["module by module"]
    assert [c["capture"] for c in ex_plan.captures] == ["torch.export"]
    assert len(fx_plan.rewritten) == 0 and [e.kind for e in ex_plan.rewritten] == ["relu"]
    assert "captured by torch.export: <root>" in str(ex_plan)


def test_auto_takes_export_only_where_fx_falls_back_and_export_reaches_more():
    net = ShapeBranchNet()
    auto = sparsify.plan(net, "tl1", example_inputs=_x())
    assert [c["capture"] for c in auto.captures] == ["torch.export"]
    assert "torch.export reaches 1 sites instead of 0" in auto.capture_notes[0]
    # weight methods reach every layer module by module: fx is kept
    weights = sparsify.plan(net, "st3", example_inputs=_x())
    assert [c["capture"] for c in weights.captures] == ["module by module"]
    # without example inputs nothing is captured from a guess
    guessed = sparsify.plan(net, "tl1")
    assert "torch.export" not in {c["capture"] for c in guessed.captures}
    # a traceable model stays on torch.fx
    resnet = sparsify.plan(torchvision.models.resnet18(num_classes=10), "tl1", example_inputs=_x(2, 32))
    assert [c["capture"] for c in resnet.captures] == ["torch.fx"]


class KeywordShapeBranchNet(ShapeBranchNet):
    """ShapeBranchNet called as transformers' models are: by keyword, its forward taking **kwargs
    (and an activation module, which module-by-module rewriting reaches)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, pixel_values=None, labels=None, **kwargs):
        out = self.act(super().forward(pixel_values))
        return out if labels is None else F.cross_entropy(out, labels)


def test_auto_keeps_fx_for_a_model_called_by_keyword():
    """An exported root serves the example's arguments only: the Trainer's model(**batch) passes
    labels (and keys only **kwargs takes), so it ran the model's own forward without the inserted
    nodes (tl1's penalty was 0 at every step of a DistilBERT whose root auto exported), and the
    graph's signature hid `labels` from the Trainer's column filter."""
    net = KeywordShapeBranchNet()
    for example in (_x(), {"pixel_values": _x()}):
        auto = _quiet(sparsify.plan, net, "tl1", example_inputs=example)
        assert [c["capture"] for c in auto.captures] == ["module by module"]
        assert any("forward takes **kwargs: an exported graph serves calls with the example's arguments only" in n
                   for n in auto.capture_notes), auto.capture_notes
    model = _quiet(sparsify.sparsify, net, "tl1", example_inputs=_x(), total_steps=3)
    model(pixel_values=_x(), labels=torch.tensor([0, 1]))
    assert float(sparsify.penalty(model)) > 0


class ShapeCheckNet(ShapeBranchNet):
    """Untraceable for torch.fx like ShapeBranchNet (a branch on the input's shape), but its own
    code calls no activation function: its ReLU is a module."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        return self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_auto_does_not_export_when_the_untraceable_code_calls_no_function_a_rule_matches(monkeypatch):
    """Module by module reaches the ReLU module already; torch.export could reach nothing more, so it
    is not run (it cost 15-30 s on segmentation_models_pytorch's models for the same sites)."""
    import sparsify.prepare.capture as capture
    exported = []
    monkeypatch.setattr(capture, "export_trace", lambda *a: exported.append(a) or export_trace(*a))
    auto = sparsify.plan(ShapeCheckNet(), "tl1", example_inputs=_x())
    assert not exported and [c["capture"] for c in auto.captures] == ["module by module"]
    assert [e.kind for e in auto.rewritten] == ["ReLU"]
    assert "calls no function a rule inserts after" in auto.capture_notes[0]
    # the functional relu of ShapeBranchNet is a reason to try
    sparsify.plan(ShapeBranchNet(), "tl1", example_inputs=_x())
    assert len(exported) == 1


@pytest.mark.parametrize("recipe", ["st3", "tl1"])
def test_exported_untraceable_net_equals_the_original_trains_finalizes_and_reloads(recipe):
    net = ShapeBranchNet()
    zero = {"sparsity": 0.0} if recipe == "st3" else {}  # tl1 changes nothing before it trains
    m = _quiet(sparsify.sparsify, net, recipe, example_inputs=_x(), capture="export", total_steps=10,
               copy=True, **zero)
    assert find_capture(m) == "torch.export"
    for mode in ("eval", "train"):
        getattr(net, mode)(), getattr(m, mode)()
        torch.manual_seed(0)
        want = net(_x(3))
        torch.manual_seed(0)
        assert torch.allclose(m(_x(3)), want, atol=1e-5), mode
    m.train()
    _train(m)
    m.eval()
    x = _x(5)
    final = sparsify.finalize(m, _x())
    assert not any("Sparse" in type(c).__name__ or "ST3" in type(c).__name__ for c in final.modules())
    assert torch.allclose(final.eval()(x), m(x), atol=1e-5)
    again = _quiet(sparsify.sparsify, ShapeBranchNet(), recipe, example_inputs=_x(), capture="export", total_steps=10,
                   **zero)
    assert again.load_state_dict(m.state_dict()).missing_keys == []
    assert torch.allclose(again.eval()(x), m(x), atol=1e-6)


def find_capture(model) -> str:
    return sparsify.core.state.find_state(model).plan.captures[0]["capture"]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_torchvision_model_both_ways(capture):
    x = _x(2, 32)
    base = torchvision.models.squeezenet1_1(num_classes=10)
    m = _quiet(sparsify.sparsify, base, "st3", example_inputs=x, capture=capture, total_steps=10, copy=True)
    assert find_capture(m) == ("torch.export" if capture == "export" else "torch.fx")
    assert sparsify.report(m).totals["weight_sparsity"] == 0.0  # st3 begins at 5% of the steps
    base.eval(), m.eval()
    assert torch.allclose(m(x), base(x), atol=1e-5)
    m.train()
    _train(m, size=32)
    assert sparsify.report(m).totals["weight_sparsity"] > 0.3
    m.eval()
    final = sparsify.finalize(m)
    assert torch.allclose(final.eval()(x), m(x), atol=1e-4)
    # the same state_dict keys either way: a checkpoint of one capture loads into the other
    again = _quiet(sparsify.sparsify, torchvision.models.squeezenet1_1(num_classes=10), "st3", example_inputs=x,
                   capture="fx", total_steps=10)
    again.load_state_dict(m.state_dict())
    assert torch.allclose(again.eval()(x), m(x), atol=1e-6)
    # both captures reach the same layers under the same names
    names = lambda model: [e.name for e in sparsify.core.state.find_state(model).plan.rewritten]  # noqa: E731
    assert names(m) == names(again) and len(names(m)) == 26


def test_export_graph_serves_other_batch_sizes_and_sends_misfits_to_the_forward():
    r = export_trace(ShapeBranchNet().train(), _x(1))  # a batch of one is doubled: the batch stays dynamic
    guard = r.module._call_guard
    assert guard.fits((_x(1),), {}, r.module) and guard.fits((_x(7),), {}, r.module)
    assert not guard.fits((_x(2, 4),), {}, r.module)  # the other branch of `if shape[-1] > 4`
    assert not guard.fits((), {"x": _x(2)}, r.module)  # another call structure
    net = ShapeBranchNet().eval()
    m = _quiet(sparsify.sparsify, net, "tl1", example_inputs=_x(), capture="export", total_steps=10).eval()
    assert torch.allclose(m(_x(2, 4)), net(_x(2, 4)), atol=1e-6)  # ran its own forward


class _PairNet(nn.Module):
    """RAFT's pattern: two images in one batch, split again. Exported on the doubled batch, the
    export's guard holds `a.size(0) + b.size(0) - (1 + a.size(0) + b.size(0)) // 2 != 1`, which
    the example's batch of one fails."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, a, b):
        f = self.conv2(torch.relu(self.conv(torch.cat([a, b], 0))))
        f1, f2 = torch.chunk(f, 2, 0)
        return (f1 * f2).mean((1, 2, 3))


def test_the_example_batch_of_one_runs_the_graph_where_the_exports_guard_refuses_it():
    """A call with the example's own sizes ran the model's own forward (tl1 recorded nothing,
    and the warning advised passing example inputs that call it so): the graph is checked to
    reproduce the forward there, so it serves that call."""
    torch.manual_seed(0)
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(_PairNet(), "tl1", capture="export", example_inputs=(a, b), total_steps=10)
        m.train()
        m(a, b)
    assert float(sparsify.penalty(m)) > 0
    assert not [w for w in caught if "its own forward runs" in str(w.message)], [str(w.message) for w in caught]
    m(torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16))  # other batches still take the graph
    assert float(sparsify.penalty(m)) > 0
    # only the example's own sizes pass where the export's checks refuse: unequal batches do not
    guard = export_trace(_PairNet(), (a, b)).module._call_guard
    assert guard.fits((a, b), {}) and not guard.fits((a, torch.randn(2, 3, 16, 16)), {})


def test_mode_stays_live_in_the_exported_graph():
    r = export_trace(ShapeBranchNet().train(), _x())
    code = r.module.code
    assert "self.training" in code and "self.drop(" in code and "self.bn(" in code
    assert not r.notes


class TrainOnlyBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 0 and self.training:  # a Python branch on the mode: export keeps one
            x = x * 2
        return self.fc(x)


def test_a_forward_branching_on_the_mode_runs_its_own_forward_in_eval():
    net = TrainOnlyBranch()
    m = _quiet(sparsify.sparsify, net, "st3", example_inputs=torch.ones(2, 4), capture="export", total_steps=10,
               sparsity=0.0)
    notes = sparsify.core.state.find_state(m).plan.capture_notes
    assert notes and "eval calls run the module's own forward" in notes[0]
    for mode in ("train", "eval"):
        getattr(net, mode)(), getattr(m, mode)()
        assert torch.allclose(m(torch.ones(3, 4)), net(torch.ones(3, 4))), mode


def test_pickled_exported_model_keeps_its_mode_live():
    m = _quiet(sparsify.sparsify, ShapeBranchNet(), "st3", example_inputs=_x(), capture="export", total_steps=10)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    m.eval(), back.eval()
    assert torch.allclose(back(_x()), m(_x()))
    deep = copy.deepcopy(m).eval()
    assert torch.allclose(deep(_x()), m(_x()))


def test_capture_option_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^capture='onnx' is not a capture mode: use \"auto\""):
        sparsify.sparsify(ShapeBranchNet(), "st3", capture="onnx")
    with pytest.raises(ValueError, match=r'^capture="export" runs the forward on example inputs'):
        sparsify.plan(ShapeBranchNet(), "st3", capture="export")

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ExportCaptureError, match="torch.export could not capture DataDependent"):
        export_trace(DataDependent(), torch.ones(2))
    with pytest.raises(ValueError, match=r'^sparsify: torch.export could not capture .*use capture="fx"'):
        sparsify.plan(nn.Sequential(nn.Linear(2, 2), DataDependent()), "st3", example_inputs=torch.ones(2, 2),
                      capture="export")


def test_recipe_capture_option_is_checked_with_or_without_the_schema():
    recipe = {"version": 1, "name": "r", "schedule": {"begin": 0, "end": 1}, "options": {"capture": "jit"},
              "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without jsonschema: "recipe not checked against the schema"
        with pytest.raises(ValueError, match=r"'jit' is not"):
            sparsify.plan(ShapeBranchNet(), recipe)


@pytest.mark.jsonschema
def test_recipe_capture_option_error_names_its_json_path():
    recipe = {"version": 1, "name": "r", "schedule": {"begin": 0, "end": 1}, "options": {"capture": "jit"},
              "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}
    with pytest.raises(ValueError, match=r"\$\.options\.capture: 'jit' is not one of"):
        sparsify.plan(ShapeBranchNet(), recipe)


def test_recipe_option_selects_the_capture():
    recipe = {"version": 1, "name": "r", "schedule": {"begin": 0, "end": 1}, "options": {"capture": "export"},
              "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "method": "st3"}]}
    p = sparsify.plan(ShapeBranchNet(), recipe, example_inputs=_x())
    assert [c["capture"] for c in p.captures] == ["torch.export"] and len(p.rewritten) == 2
    p = sparsify.plan(ShapeBranchNet(), recipe, example_inputs=_x(), capture="fx")  # the argument wins
    assert [c["capture"] for c in p.captures] == ["module by module"]


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # a tensor made in forward: torch.export lifts it as this module's constant
        return self.fc(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])


class ConstantsNet(nn.Module):
    """Constants made in the forward of the root and of a submodule, as Swin's attention makes its
    relative position index (the export named it ``features.1.1.attn.lifted_tensor_0``)."""

    def __init__(self):
        super().__init__()
        self.sub = _Scaled()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.sub(x) + torch.tensor([0.5, 0.0, 0.0, 1.0])))


def test_constants_made_in_forward_capture_without_new_state_dict_keys_or_attributes():
    import pickle
    torch.manual_seed(0)
    model, x = ConstantsNet(), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = sparsify.sparsify(model, "st3", total_steps=10, example_inputs=(x,), capture="export")
    assert not hasattr(model.sub, "lifted_tensor_0")  # the user's submodule is not written to
    keys = sorted(ConstantsNet().state_dict())
    for copy_ in (sm, copy.deepcopy(sm), pickle.loads(pickle.dumps(sm))):
        assert torch.allclose(copy_(x), model(x))
        assert not [k for k in copy_.state_dict() if k not in sm.state_dict()]
        assert not [k for k in copy_.state_dict() if "constant" in k or "lifted" in k]
    wide = copy.deepcopy(sm).double()  # the constants move with the model, as buffers do
    assert wide(x.double()).dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(copy.deepcopy(sm).eval())
    assert sorted(final.state_dict()) == keys
    fresh = ConstantsNet()
    fresh.load_state_dict(final.state_dict())  # strict
    assert torch.allclose(fresh(x), final(x))
