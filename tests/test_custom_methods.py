"""Methods written outside the library, as docs/writing-a-method.md shows: the hooks a user's group
leaves at their defaults, and the mistakes such a file can make, give what the built-in methods give."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsify
from sparsify.core.contract import Group, Method
from sparsify.core.params import Params, param
from sparsify.core.registry import REGISTRY, register


@pytest.fixture
def registered():
    """Register methods for one test; they leave the registry after it."""
    names = []

    def add(cls):
        register(cls)
        names.append(cls.name)
        return cls
    yield add
    for name in names:
        REGISTRY.pop(name, None)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def rules(method, **params):
    return {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": method, "params": params}]}


@dataclass
class OneShotParams(Params):
    sparsity: float = param(0.5, "Fraction of each layer's weights zeroed at `at`.", ge=0, lt=1)
    at: float = param(0, "Step of the pruning.", time=True)


class OneShotGroup(Group):
    """docs/writing-a-method.md's group: prunes plain layers in place at ``at``, declares nothing."""

    def __init__(self, method, params, members, ctx):
        super().__init__(method, params, members, ctx)
        self.at = ctx.time(params["at"], "at")

    @torch.no_grad()
    def update(self, step, loss=None):
        if step != self.at:
            return
        for m in self.members.values():
            k = int(self.params["sparsity"] * m.weight.numel())
            cut = m.weight.abs().flatten().kthvalue(k).values
            m.weight[m.weight.abs() <= cut] = 0

    def finalize_member(self, name, module):
        return module


def one_shot(name="t-one-shot", group=OneShotGroup):
    class OneShot(Method):
        Params = OneShotParams
        group_class = group

        def apply(self, site, params):
            site.replace(site.module)
    OneShot.name = name
    return OneShot


def test_a_step0_write_of_an_undeclared_group_leaves_the_callers_weights(registered):
    """A method that prunes at step 0 and does not declare writes_weights: sparsify() (default mode)
    writes a copy, so the caller's weights are unchanged, also when the update fails halfway; a group
    whose step 0 writes nothing keeps sharing the caller's tensors."""
    registered(one_shot())
    dense = net()
    before = [p.clone() for p in dense.parameters()]
    model = sparsify.sparsify(dense, rules("t-one-shot"), example_inputs=torch.randn(2, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))
    assert float((model[0].weight == 0).float().mean()) == 0.5
    assert model[0].bias is dense[0].bias  # left unchanged by step 0: shared again

    class Failing(OneShotGroup):
        @torch.no_grad()
        def update(self, step, loss=None):
            for i, m in enumerate(self.members.values()):
                m.weight.data.zero_()  # through .data: no version change
                if i == 1:
                    raise RuntimeError("bug in the method")
    registered(one_shot("t-failing", Failing))
    with pytest.raises(RuntimeError, match="bug in the method"):
        sparsify.sparsify(dense, rules("t-failing"), example_inputs=torch.randn(2, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))

    late = sparsify.sparsify(dense, rules("t-one-shot", at=3), example_inputs=torch.randn(2, 8), total_steps=10)
    assert late[0].weight is dense[0].weight and late[2].weight is dense[2].weight


def test_an_undeclared_group_on_a_meta_model_keeps_sharing_its_weights(registered):
    """On a model built on the meta device (no values), an undeclared group whose step 0 reads
    nothing: sparsify() shares the caller's tensors as it does for the built-in methods."""
    class Quiet(OneShotGroup):
        def update(self, step, loss=None):
            pass
    registered(one_shot("t-quiet", Quiet))
    with torch.device("meta"):
        dense = nn.Sequential(nn.Linear(8, 8))
    model = sparsify.sparsify(dense, rules("t-quiet"))
    assert model[0].weight is dense[0].weight


def test_report_counts_the_zeros_of_plain_layer_members(registered):
    """A method that prunes plain layers in place (no SparseWeightMixin): the report counts their
    zeros, non-zero parameters and non-zero-weight MACs, rather than saying nothing was pruned."""
    registered(one_shot())
    model = sparsify.sparsify(net(), rules("t-one-shot"), example_inputs=torch.randn(2, 8))
    rep = sparsify.report(model)
    assert [(r.params, r.nonzero_params, r.achieved) for r in rep.layers] == [(128, 64, 0.5), (64, 32, 0.5)]
    assert (rep.totals["macs"], rep.totals["nonzero_macs"]) == (192, 96)
    assert rep.totals["weight_sparsity"] == 0.5 and rep.totals["nonzero_params"] == 212 - 96


class Recorder(nn.Module):
    """A user's inserted module that does not call sparsify.core.forwards.entered."""

    def forward(self, x):
        return x * 1.0


class Inserting(Method):
    name = "t-inserting"
    site = "node"
    inserts_after = True

    def apply(self, site, params):
        site.insert_after(Recorder(), "rec")


def test_members_that_do_not_call_entered_are_watched(registered):
    """Members of a user's method that do not call entered() themselves (a plain layer kept, an
    inserted module): training the sparse model says nothing about another model being trained,
    torch.fx retracing the model is refused, and the finalized model carries no hook of sparsify's."""
    registered(one_shot())
    registered(Inserting)
    recipe = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "t-one-shot", "params": {"at": 1}},
                                      {"match": {"type": "ReLU"}, "method": "t-inserting"}]}
    model = sparsify.sparsify(net(), recipe, example_inputs=torch.randn(2, 8), total_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            sparsify.step(model)
    with pytest.raises(RuntimeError, match="cannot be traced again by torch.fx"):
        torch.fx.symbolic_trace(model)
    final = sparsify.finalize(model)
    assert not any(m._forward_pre_hooks for m in final.modules())


def test_step0_update_runs_without_autograd_as_later_steps_do(registered):
    """An update that writes its members' weights in place without its own torch.no_grad() works
    at step 0 (run by sparsify()) as at the later steps (run by sparsify.step)."""
    seen = []

    class Writing(OneShotGroup):
        def update(self, step, loss=None):  # no @torch.no_grad()
            seen.append(torch.is_grad_enabled())
            for m in self.members.values():
                m.weight[0, 0] = 0.0
    registered(one_shot("t-writing", Writing))
    model = sparsify.sparsify(net(), rules("t-writing"), example_inputs=torch.randn(2, 8))
    sparsify.step(model)
    assert seen == [False, False] and float(model[0].weight.detach()[0, 0]) == 0.0


def test_a_user_methods_time_params_take_the_schedule_block_and_are_warned_past_the_run(registered):
    """A time param of a user's method (docs/writing-a-method.md's ``at``) is filled by the recipe's
    schedule block, as the generated schema says, and a time after the run is warned, as ``end`` is."""
    registered(one_shot())
    recipe = {"version": 1, "schedule": {"at": 3}, "rules": [{"match": {"type": "Linear"}, "method": "t-one-shot"}]}
    assert sparsify.load_recipe(recipe).rules[0].params["at"] == 3
    with pytest.raises(sparsify.RecipeError, match=r"\$\.schedule\.atx: unknown key 'atx' \(allowed here: at, begin"):
        sparsify.load_recipe({**recipe, "schedule": {"atx": 3}})
    with pytest.warns(UserWarning, match="at is step 30, after the run's total_steps=20: the run never reaches it"):
        sparsify.sparsify(net(), rules("t-one-shot", at=30), example_inputs=torch.randn(2, 8), total_steps=20)


def _method_with(params_cls):
    class Bad(Method):
        name = "t-bad"
        Params = params_cls
    return Bad


def test_params_class_mistakes_are_one_line_errors_naming_method_and_field(registered):
    """A Params class without @dataclass, a field not made with param(), an unsupported type: a
    TypeError naming the method and the field when the method is defined; recipe params given to a
    method without params say it takes none."""
    class Undecorated(Params):
        sparsity: float = param(0.5, "fraction of zeros")
    with pytest.raises(TypeError, match=r"^method 't-bad': Undecorated is not a dataclass: decorate it with @dataclass"):
        _method_with(Undecorated)

    @dataclass
    class Plain(Params):
        sparsity: float = 0.5
    with pytest.raises(TypeError, match=r"^method 't-bad': Plain.sparsity is not made with sparsify.core.params.param"):
        _method_with(Plain)

    @dataclass
    class Tupled(Params):
        shape: tuple = param((2, 4), "a block shape")
    with pytest.raises(TypeError, match=r"^method 't-bad': Tupled.shape: unsupported parameter type <class 'tuple'>"):
        _method_with(Tupled)

    @dataclass
    class ListOfTuples(Params):
        shapes: list[tuple] = param([], "block shapes")
    with pytest.raises(TypeError, match=r"^method 't-bad': ListOfTuples.shapes: unsupported parameter type"):
        _method_with(ListOfTuples)

    class Extended(OneShotParams):  # adds a field without @dataclass: the field would not be one
        margin: float = param(0.1, "a margin")
    with pytest.raises(TypeError, match=r"^method 't-bad': Extended is not a dataclass"):
        _method_with(Extended)

    class NoParams(Method):
        name = "t-no-params"

        def apply(self, site, params):
            site.replace(site.module)
    registered(NoParams)
    with pytest.raises(sparsify.RecipeError, match=r"unknown parameter of method 't-no-params'; it takes none$"):
        sparsify.load_recipe(rules("t-no-params", sparsity=0.5))


def test_a_penalty_that_is_no_scalar_names_the_method_and_a_number_is_taken(registered):
    """sparsify.penalty takes a group's Python number as a constant term, and refuses a tensor of
    several elements naming the method and the group and what is expected."""
    returned = [2.0]

    class Penalizing(Group):
        def penalty(self):
            return returned[0]

    class Pen(Method):
        name = "t-penalty"
        group_class = Penalizing

        def apply(self, site, params):
            site.replace(site.module)
    registered(Pen)
    model = sparsify.sparsify(net(), rules("t-penalty"), example_inputs=torch.randn(2, 8))
    assert float(sparsify.penalty(model)) == 2.0
    returned[0] = torch.ones(2, 3)
    with pytest.raises(TypeError, match=r"^sparsify.penalty: t-penalty \(rule0_t_penalty\): penalty\(\) returned a "
                                        r"tensor of shape \(2, 3\); it must return a scalar tensor"):
        sparsify.penalty(model)
    returned[0] = True  # a bool is no number here
    with pytest.raises(TypeError, match=r"penalty\(\) returned a bool; it must return"):
        sparsify.penalty(model)
    returned[0] = torch.tensor([3.0], dtype=torch.float16)  # one element: taken, in float32
    total = sparsify.penalty(model)
    assert total.dtype == torch.float32 and total.shape == () and float(total) == 3.0
    returned[0] = torch.tensor([3.0], dtype=torch.float64)  # a float64 term (a float64 model's) stays float64
    assert sparsify.penalty(model).dtype == torch.float64

    # a number goes beside the other groups' tensors (on their device; meta here), also when it comes first
    returned[0] = 1.0
    two = {"version": 1, "rules": [{"match": {"name": "0"}, "method": "t-penalty"},
                                   {"match": {"name": "2"}, "method": "t-penalty-meta"}]}

    class OnMeta(Group):
        def penalty(self):
            return torch.ones((), device="meta")

    class PenMeta(Pen):
        name = "t-penalty-meta"
        group_class = OnMeta
    registered(PenMeta)
    model = sparsify.sparsify(net(), two, example_inputs=torch.randn(2, 8))
    assert sparsify.penalty(model).device.type == "meta"


class Doubling(nn.Module):
    def forward(self, x):
        return 2 * x


def test_finalize_keeps_plain_layer_members_and_names_a_member_it_removed(registered):
    """Without a finalize_member: a plain Linear member stays in the finalized model as it is; an
    inserted module that is no identity is removed by the default, and the output check's error
    names it and the missing finalize_member."""
    class Keep(Method):
        name = "t-keep"

        def apply(self, site, params):
            site.replace(site.module)

    class Double(Inserting):
        name = "t-double"

        def apply(self, site, params):
            site.insert_after(Doubling(), "x2")
    registered(Keep)
    registered(Double)
    model = sparsify.sparsify(net(), rules("t-keep"), example_inputs=torch.randn(2, 8))
    final = sparsify.finalize(model)
    assert [type(m).__name__ for m in final.children()] == ["Linear", "ReLU", "Linear"]
    recipe = {"version": 1, "rules": [{"match": {"type": "ReLU"}, "method": "t-double"}]}
    model = sparsify.sparsify(net(), recipe, example_inputs=torch.randn(2, 8))
    with pytest.raises(sparsify.FinalizeError, match=r"finalize removed 1_x2 \(t-double: Doubling\): its group has "
                                                     "no finalize_member"):
        sparsify.finalize(model)


class ListRecorder(nn.Module):
    """A user's regularizer keeping its terms in a plain list (not RecordsMixin)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.records.append(x.abs().mean())
        return x


def test_finalize_names_the_module_holding_a_live_graph(registered):
    """finalize after a training forward of a regularizer keeping its terms in a plain list: the
    error names the attribute holding them and RecordsMixin, not torch's deepcopy message alone."""
    class Rec(Inserting):
        name = "t-list-rec"

        def apply(self, site, params):
            site.insert_after(ListRecorder(), "rec")
    registered(Rec)
    recipe = {"version": 1, "rules": [{"match": {"type": "ReLU"}, "method": "t-list-rec"}]}
    model = sparsify.sparsify(net(), recipe, example_inputs=torch.randn(2, 8))
    model.train()
    model(torch.randn(4, 8))
    with pytest.raises(sparsify.FinalizeError, match=r"1_rec.records holds tensors of a training forward's autograd "
                                                     r"graph.*RecordsMixin"):
        sparsify.finalize(model)


def test_the_same_class_defined_again_replaces_its_registration(registered):
    """A notebook cell run twice defines the method's class again (same module and qualified
    name): the second registration replaces the first; another class under the name is an error
    naming both and what to do."""
    def define():
        class Again(Method):
            name = "t-again"

            def apply(self, site, params):
                site.replace(site.module)
        return Again
    first, second = define(), define()
    registered(first)
    register(second)
    assert type(REGISTRY["t-again"]) is second

    elsewhere = define()
    elsewhere.__module__ = "another_module"  # the same qualified name in another module: another class
    with pytest.raises(ValueError, match=r"registered twice .*another_module\."):
        register(elsewhere)

    class Other(Method):
        name = "t-again"
    with pytest.raises(ValueError, match=r"method 't-again' is registered twice .*: give one of them another name"):
        register(Other)


def test_a_name_with_a_dot_is_refused_at_registration():
    """It registered, then every sparsify() failed in torch: "module name can't contain '.'"."""
    class Dotted(Method):
        name = "my.method"
    with pytest.raises(ValueError, match=r"^Dotted.name is 'my.method': a method's name is a string without '.'"):
        register(Dotted)


def test_a_built_in_name_is_refused_at_registration_before_the_built_ins_load():
    """``import sparsify`` does not import sparsify.methods: a user's method named 'magnitude'
    registered, and the error came later, from inside the built-in's import at the first sparsify()."""
    code = textwrap.dedent("""
        from sparsify.core.contract import Method
        from sparsify.core.registry import register
        class MyGMP(Method):
            name = "magnitude"
        try:
            register(MyGMP)
        except ValueError as e:
            print(e)
        """)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.stdout.strip() == ("method 'magnitude' is a built-in method's name (__main__.MyGMP): give yours another "
                                  "name"), out.stdout + out.stderr


def test_the_built_in_names_core_knows_are_the_methods_packages():
    """core/registry.py lists them (core does not import methods): the list follows the package."""
    from sparsify.core.registry import BUILT_IN_NAMES
    from sparsify.methods import BUILT_IN
    assert BUILT_IN_NAMES == {m.name for m in BUILT_IN}


def test_report_to_json_takes_tensors_a_method_describes_with(registered):
    """describe, layer_stats and target returning tensors: the report holds Python numbers and
    to_json works."""
    class Tensors(Group):
        def target(self, step):
            return torch.tensor([0.5])  # one element: a number

        def final_target(self):
            return torch.tensor(0.5)

        def describe(self, step):
            return {"threshold": torch.tensor(0.25), "per_layer": [torch.tensor([1, 2])],
                    "pair": (torch.tensor(1), torch.tensor(2))}

        def layer_stats(self, name, module, factor=None):
            return {"score": torch.tensor(0.75)}

    class T(Method):
        name = "t-tensors"
        group_class = Tensors

        def apply(self, site, params):
            site.replace(site.module)
    registered(T)
    model = sparsify.sparsify(net(), rules("t-tensors"), example_inputs=torch.randn(2, 8))
    d = json.loads(sparsify.report(model).to_json())
    assert d["groups"]["rule0_t_tensors"] == {"method": "t-tensors", "target": 0.5, "threshold": 0.25,
                                              "per_layer": [[1, 2]], "pair": [1, 2]}
    assert d["layers"][0]["extra"] == {"score": 0.75} and d["layers"][0]["target"] == 0.5
    assert d["layers"][0]["final_target"] == 0.5


def test_every_builtin_group_with_an_update_says_whether_step_0_writes_weights():
    """A group that leaves writes_weights undeclared gets a copy of every caller tensor its members hold
    during sparsify() (what a user's method gets, to be safe); a built-in one must say, or it pays that copy."""
    undeclared = sorted(name for name, method in REGISTRY.items()
                        if method.__module__.startswith("sparsify.methods")
                        and method.group_class.update is not Group.update
                        and method.group_class.writes_weights is Group.writes_weights)
    assert not undeclared, f"built-in groups with an update but no writes_weights: {undeclared}"


class Scaled(nn.Linear):
    """A Linear subclass holding a buffer of its own (no forward of its own: rewritten as a Linear)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.register_buffer("scale", torch.ones(1))


def test_step0_copies_keep_ties_frozen_flags_and_cover_buffers_of_undeclared_groups(registered):
    """The copies step 0 writes: an undeclared group's buffers and biases get one too (the caller's
    stay), a weight tied to a module outside the group stays tied to it, a frozen weight stays
    frozen; a group declaring writes_weights(0) copies its weights only and shares the rest."""
    class Everything(OneShotGroup):
        @torch.no_grad()
        def update(self, step, loss=None):
            super().update(step, loss)
            for m in self.members.values():
                m.bias.add_(1)
                if hasattr(m, "scale"):
                    m.scale.fill_(2)
    registered(one_shot("t-everything", Everything))
    torch.manual_seed(0)
    dense = nn.Sequential(Scaled(8, 8), nn.ReLU(), nn.Linear(8, 8))
    dense[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    recipe = {**rules("t-everything"), "options": {"frozen": "include"}}
    model = sparsify.sparsify(dense, recipe, example_inputs=torch.randn(2, 8))
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert float(model[0].scale) == 2 and not model[0].weight.requires_grad

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(8, 8), nn.Linear(8, 8)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))
    registered(one_shot())
    tied = Tied()
    model = sparsify.sparsify(tied, rules("t-one-shot"), example_inputs=torch.zeros(2, dtype=torch.long))
    assert model.head.weight is model.emb.weight and model.head.weight is not tied.head.weight

    class Declared(OneShotGroup):
        def writes_weights(self, step):
            return step == self.at
    registered(one_shot("t-declared", Declared))
    dense = net()
    model = sparsify.sparsify(dense, rules("t-declared"), example_inputs=torch.randn(2, 8))
    assert model[0].weight is not dense[0].weight and model[0].bias is dense[0].bias


class SlotsGroup(OneShotGroup):
    """Its target is of another kind than the weights' (docs/index.md: SAS's input slots)."""

    def layer_stats(self, name, module, factor=None):
        return {"sparsifies": "input slots", "achieved": 0.25}


class OwnAchievedGroup(OneShotGroup):
    def layer_stats(self, name, module, factor=None):
        return {"achieved": 0.75}


def test_a_methods_own_achieved_and_kind_are_what_the_report_totals(registered):
    """docs/writing-a-method.md: ``layer_stats``' ``achieved`` is the method's figure, and a target of
    another kind than the weights' (``sparsifies``) stays out of the headline weight target."""
    registered(one_shot("t-slots", SlotsGroup))
    registered(one_shot("t-own", OwnAchievedGroup))
    x = torch.randn(2, 8)
    rep = sparsify.report(sparsify.sparsify(net(), rules("t-slots"), example_inputs=x))
    assert [(r.sparsifies, r.target, r.achieved) for r in rep.layers] == [("input slots", 0.5, 0.25)] * 2
    t = rep.totals
    assert (t["targeted_layers"], t["target"], t["targeted_weight_sparsity"]) == (0, None, None)
    assert t["weight_sparsity"] == 0.5 and t["achieved"] == {"input slots": 0.25}
    rep = sparsify.report(sparsify.sparsify(net(), rules("t-own"), example_inputs=x))
    assert [(r.sparsifies, r.weight_sparsity, r.achieved) for r in rep.layers] == [("weights", 0.5, 0.75)] * 2
    assert rep.totals["achieved"] == {"weights": 0.75} and rep.totals["targeted_layers"] == 2


@pytest.mark.parametrize("hook", ["warnings", "build_warnings"])
def test_a_group_whose_warnings_are_one_string_is_told(registered, hook):
    """One string was warned one character at a time ("s", "o", "m", ...)."""
    class Chatty(Group):
        def writes_weights(self, step):
            return False

    setattr(Chatty, hook, lambda self: "something is off")

    @registered
    class ChattyMethod(Method):
        name, group_class = "t-chatty", Chatty

        def apply(self, site, params):
            site.replace(site.module)
    said = rf"^method 't-chatty': its group's {hook}\(\) returned a str; it returns a list of messages"
    if hook == "build_warnings":
        with pytest.raises(TypeError, match=said):
            sparsify.sparsify(net(), rules("t-chatty"), total_steps=4)
        return
    m = sparsify.sparsify(net(), rules("t-chatty"), total_steps=4)
    with pytest.raises(TypeError, match=said):
        sparsify.step(m)


def test_an_apply_that_rewrites_nothing_and_a_missing_apply_are_told(registered):
    """An apply() that neither replaced nor inserted was a silent no-op (a group with 0 members, only
    report saying "no layer is sparsified"); a Method without apply raised an empty NotImplementedError."""
    @registered
    class Idle(Method):
        name = "t-idle"

        def apply(self, site, params):
            pass

    @registered
    class NoApply(Method):
        name = "t-no-apply"
    with pytest.raises(RuntimeError, match=r"^method 't-idle': apply\(\) gave 0 no module \(neither site.replace"):
        sparsify.sparsify(net(), rules("t-idle"), total_steps=4)
    with pytest.raises(NotImplementedError, match=r"^method 't-no-apply' \(NoApply\) has no apply\(site, params\)"):
        sparsify.sparsify(net(), rules("t-no-apply"), total_steps=4)
