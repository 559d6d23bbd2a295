"""passes/ on its own: generic fx machinery, no sparsity involved."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

from passes import (Change, PassResult, Pipeline, compile_glob, compute_nodes, copy_chain, first_and_last,
                    insert_after, insert_call, is_depthwise, is_grouped, kernel_size_in, module_path_of, node_name,
                    remove_node, replace_module, replace_uses, reroute_input, reroute_later_reads, set_call,
                    set_submodule, target_module, to_networkx, trace, unique_name)


def select(gm, pred):
    return [n for n in gm.graph.nodes if pred(n, target_module(gm, n))]


def by_type(*types):
    return lambda node, mod: isinstance(mod, types)


class Block(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.conv(x))


class ModeDependent(nn.Module):
    """Behaviour that depends on ``self.training``, like stochastic depth."""

    def forward(self, x):
        if self.training:
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.mode = ModeDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.mode(self.block(F.relu(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


# ---------------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------------

def test_trace_full_depth_like_symbolic_trace():
    r = trace(Net())
    assert isinstance(r.module, fx.GraphModule) and r.fallbacks == [] and r.direct == []
    assert call_targets(r.module) == ["stem", "block.conv", "block.act", "head"]
    assert list(r.graphs) == [""]


def test_trace_depth_is_limited_by_descend():
    r = trace(Net(), lambda name, m: name != "block")
    assert call_targets(r.module) == ["stem", "block", "head"]


def test_leaf_keeps_mode_dependent_code_live():
    x = torch.randn(1, 3, 5, 5)
    net = Net().train()
    deep = trace(net).module  # traced through ModeDependent: the graph holds its training branch
    shallow = trace(net, lambda name, m: name != "mode").module
    assert deep._call_guard.modes == {("mode", "training"): True}
    deep.eval(), shallow.eval(), net.eval()
    assert torch.equal(shallow(x), net(x))
    assert torch.equal(deep(x), net(x))  # in eval the guard runs Net's own forward
    deep.train(), net.train()
    torch.manual_seed(0)
    a = deep(x)
    torch.manual_seed(0)
    assert torch.equal(a, net(x))


def test_trace_keeps_hierarchy_and_state_dict():
    net = Net()
    r = trace(net)
    assert r.module.block is net.block
    assert r.module.state_dict().keys() == net.state_dict().keys()
    assert r.module.training == net.training


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return self.other(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.bad = Untraceable()

    def forward(self, x):
        return self.bad(self.stem(x))


def test_fallback_is_recorded_and_children_traced():
    is_conv = lambda name, m: isinstance(m, nn.Conv2d)  # noqa: E731
    outer = Outer()
    with torch.no_grad():  # the sign of the input picks the branch
        outer.stem.weight.fill_(1.0)
        outer.stem.bias.zero_()
    r = trace(copy.deepcopy(outer), is_site=is_conv)
    assert [f.name for f in r.fallbacks] == ["bad"]
    assert "TraceError" in r.fallbacks[0].reason
    assert call_targets(r.module) == ["stem", "bad"]
    # the untraceable module's children are reached one by one
    assert isinstance(r.module.bad.inner, fx.GraphModule)
    assert "bad.inner" in r.graphs
    assert r.direct == ["bad.other"]
    assert call_targets(r.graphs["bad.inner"]) == ["0", "1"]
    for sign in (1, -1):  # both branches of the untraceable module
        x = sign * torch.rand(1, 3, 4, 4)
        assert torch.equal(r.module(x), outer(x))


def test_untraceable_root_falls_back_one_level_down():
    r = trace(Untraceable(), is_site=lambda name, m: isinstance(m, nn.Conv2d))
    assert r.fallbacks[0].name == "" and not isinstance(r.module, fx.GraphModule)
    assert r.direct == ["other"] and "inner" in r.graphs


def test_module_path_of():
    gm = trace(Net()).module
    paths = {n.name: module_path_of(n) for n in gm.graph.nodes}
    assert paths["block_conv"] == "block.conv"
    assert paths["add"] == "block"
    assert paths["x"] == ""


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, name, hit", [
    ("layer1.*.conv1", "layer1.0.conv1", True),
    ("layer1.*.conv1", "layer1.0.x.conv1", False),
    ("layer1.**.conv1", "layer1.0.x.conv1", True),
    ("layer*", "layer1.0.conv1", False),
    ("layer**", "layer1.0.conv1", True),
    ("**", "fc", True),
    ("fc", "fc", True),
    ("fc", "fc2", False),
    ("conv?", "conv1", True),
    ("conv?", "conv12", False),
    ("conv[12]", "conv2", True),
    ("conv[12]", "conv3", False),
    ("a.b", "aXb", False),  # dots are literal
    ("features.*", "features.0", True),
    ("*.0", "features.0.1", False),
    # a whole-component ** is zero or more components, as gitignore's **/
    ("**.conv1", "conv1", True),
    ("**.conv1", "layer1.0.conv1", True),
    ("**.conv1", "xconv1", False),
    ("layer1.**.conv1", "layer1.conv1", True),
    ("layer1.**.conv1", "layer1.xconv1", False),
    ("layer1.**", "layer1", False),
    ("a**.b", "b", False),
])
def test_globs(pattern, name, hit):
    """Globs match whole names; ``**.`` also matches no component (``**.conv1`` the root's conv1)."""
    assert bool(compile_glob(pattern).fullmatch(name)) == hit


def test_shape_predicates():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1, groups=2), nn.Conv2d(16, 4, 5),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))
    gm = fx.symbolic_trace(model)

    def names(pred):
        return [str(n.target) for n in select(gm, pred)]

    assert names(is_grouped) == ["0", "1"]
    assert names(is_depthwise) == ["0"]
    assert names(kernel_size_in([3, 5])) == ["0", "2"]
    assert [node_name(n, "head") for n in select(gm, by_type(nn.Linear))] == ["head.5"]


# ---------------------------------------------------------------------------------------------
# graph view
# ---------------------------------------------------------------------------------------------

def test_to_networkx_and_first_last_on_resnet18():
    gm = fx.symbolic_trace(torchvision.models.resnet18())
    g = to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    assert g.nodes["conv1"]["op"] == "call_module"
    is_compute = lambda n, m: isinstance(m, (nn.Conv2d, nn.Linear))  # noqa: E731
    assert len(compute_nodes(gm, is_compute)) == 21
    first, last = first_and_last(gm, is_compute, g)
    assert (first, last) == ({"conv1"}, {"fc"})


def test_first_and_last_with_branches():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)
            self.mid = nn.Linear(2, 2)
            self.h1 = nn.Linear(2, 1)
            self.h2 = nn.Linear(2, 1)

        def forward(self, x):
            y = self.mid(torch.cat([self.a(x), self.b(x)], 1)[:, :2])
            return self.h1(y), self.h2(y)

    gm = fx.symbolic_trace(TwoHeads())
    first, last = first_and_last(gm, lambda n, m: isinstance(m, nn.Linear))
    assert first == {"a", "b"} and last == {"h1", "h2"}


# ---------------------------------------------------------------------------------------------
# rewrite primitives and the pipeline
# ---------------------------------------------------------------------------------------------

def test_replace_module_keeps_node_and_name():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    relu = list(gm.graph.nodes)[2]
    change = replace_module(gm, relu, nn.GELU())
    assert change == Change("replace", "1", "ReLU -> GELU")
    assert isinstance(gm.get_submodule("1"), nn.GELU) and relu.target == "1"
    gm.recompile()
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), F.gelu(gm.get_submodule("0")(x)))
    with pytest.raises(ValueError, match="needs a call_module node"):
        replace_module(gm, list(gm.graph.nodes)[0], nn.ReLU())


def test_insert_after_reroutes_users_and_names_uniquely():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    lin = list(gm.graph.nodes)[1]
    new, change = insert_after(gm, lin, nn.Identity(), "0_probe")
    assert change.kind == "insert" and change.target == "0_probe"
    assert list(lin.users) == [new] and list(new.users)[0].target == "1"
    new2, change2 = insert_after(gm, lin, nn.Identity(), "0_probe", reroute_users=False)
    assert change2.target == "0_probe_1" and new2.users == {}
    assert unique_name(gm, "0_probe") == "0_probe_2"
    assert remove_node(gm, new2, delete_module=True) == Change("erase", new2.name)
    assert not hasattr(gm, "0_probe_1")
    gm.graph.lint()
    with pytest.raises(AttributeError):
        insert_after(gm, lin, nn.Identity(), "missing_parent.probe")


def test_reroute_input_and_set_submodule():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ReLU()
            self.b = nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))

    gm = fx.symbolic_trace(M())
    x_node, a_node, b_node = list(gm.graph.nodes)[:3]
    change = reroute_input(b_node, a_node, x_node)
    assert change == Change("reroute", "b", "input a -> x")
    assert remove_node(gm, a_node).kind == "erase"  # no users left: nothing to reroute
    gm.recompile()
    x = -torch.ones(1, 2)
    torch.testing.assert_close(gm(x), gm.b(x))  # the relu is gone
    set_submodule(gm, "b", nn.Identity())
    assert isinstance(gm.b, nn.Identity)


def test_pipeline_logs_lints_recompiles_and_propagates_shapes():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))

    def to_gelu(gm):
        node = select(gm, by_type(nn.ReLU))[0]
        return PassResult(gm, True, [replace_module(gm, node, nn.GELU())])

    def add_identity(gm):
        node = select(gm, by_type(nn.GELU))[0]
        _, change = insert_after(gm, node, nn.Identity(), "tail")
        return PassResult(gm, True, [change])

    def noop(gm):
        return PassResult(gm, False)

    p = Pipeline([to_gelu, add_identity, noop], example_inputs=(torch.randn(2, 3),)).run(gm)
    assert [(name, c.kind) for name, c in p.log] == [("to_gelu", "replace"), ("add_identity", "insert")]
    out = p.graph_module
    assert "tail" in out.code  # recompiled
    tail = [n for n in out.graph.nodes if n.target == "tail"][0]
    assert tuple(tail.meta["tensor_meta"].shape) == (2, 4)

    def breaks_graph(gm):
        node = select(gm, by_type(nn.Identity))[0]
        out_node = [n for n in gm.graph.nodes if n.op == "output"][0]
        node.args = (out_node,)  # uses a node defined later: lint must catch it
        return PassResult(gm, True, [])

    with pytest.raises(RuntimeError):
        Pipeline([breaks_graph]).run(out)


def test_replace_uses_remove_node_and_insert_call():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True), nn.Linear(2, 2)))
    lin, relu, out_lin = list(gm.graph.nodes)[1:4]
    new, change = insert_call(gm, relu, "call_function", torch.relu, (lin,), meta_from=relu)
    assert change.kind == "insert" and not new.users
    assert replace_uses(relu, new) == Change("reroute", relu.name, f"every use -> {new.name}")
    assert list(new.users) == [out_lin]
    assert remove_node(gm, relu, delete_module=True).kind == "erase"
    assert not hasattr(gm, "1")
    gm.graph.lint()
    gm.recompile()
    x = torch.randn(3, 2)
    torch.testing.assert_close(gm(x), gm.get_submodule("2")(torch.relu(gm.get_submodule("0")(x))))
    # an identity-like call removed: its users read its first input
    ident = fx.symbolic_trace(nn.Sequential(nn.Identity(), nn.ReLU()))
    remove_node(ident, list(ident.graph.nodes)[1])
    assert [n.op for n in ident.graph.nodes] == ["placeholder", "call_module", "output"]
    assert isinstance(ident.get_submodule("0"), nn.Identity)  # no delete_module: the module stays


def test_remove_node_keeps_a_module_another_node_still_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.act(x) - 1)

    gm = fx.symbolic_trace(Twice())
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    remove_node(gm, first, delete_module=True)
    gm.graph.lint()
    gm.recompile()
    assert isinstance(gm.act, nn.ReLU)  # the second call still needs it
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), torch.relu(x - 1))


def test_reroute_later_reads_leaves_the_reads_before_the_write():
    """An in-place op made out of place: what read the value before the write still reads the value
    (the old one), what read it after reads the op's result."""
    gm = fx.symbolic_trace(lambda x: (x * 2) + x.relu_() + x)
    x, mul, relu, add, add_1, out = gm.graph.nodes
    reroute_later_reads(x, relu)
    assert mul.args[0] is x and relu.args == (x,) and add_1.args[1] is relu
    relu.target = "relu"  # out of place now
    gm.graph.lint()
    gm.recompile()
    v = torch.tensor([-1.0, 2.0])
    torch.testing.assert_close(gm(v), v * 2 + v.relu() + v.relu())


def test_copy_chain_and_set_call():
    class M(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            return torch.flatten(y.mean(1, keepdim=True), 1), x

    gm = fx.symbolic_trace(M())
    x, relu, mean, flat = list(gm.graph.nodes)[:4]
    copies, changes = copy_chain(gm, [mean, flat], relu, x)
    assert [c.kind for c in changes] == ["insert", "insert"]
    assert copies[0].args[0] is x and copies[1].args[0] is copies[0]
    assert copies[0].target == mean.target and copies[1].target == flat.target
    change = set_call(relu, target=torch.sigmoid)
    assert change == Change("edit", relu.name, "target relu -> sigmoid")
    assert set_call(mean, kwargs={"keepdim": False}).detail == "keepdim=False" and mean.kwargs["keepdim"] is False
