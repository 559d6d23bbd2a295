"""Regression tests for passes/ tracing: fallbacks where a forward cannot be traced (many blocks,
asserts, activation checkpointing, mode branches, mistraced blocks), what a trace reports
(warnings, chosen fallbacks), and the guards of graphs captured by torch.export that send a call
the graph was not captured for (or an eval call) to the module's own forward."""
from __future__ import annotations

import functools
import sys
import threading
import types
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from passes import export_trace, trace
from passes.call_record import CallRecord
from passes.checkpoint_guard import refuse_checkpoint
from passes.mode_branches import graph_key


def fallback_names(result):
    return [f.name for f in result.fallbacks]


class DataBranch(nn.Module):
    """Branches on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).relu()


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Block()
        self.b = Block()

    def forward(self, x):
        return self.b(self.a(x))


# ---------------------------------------------------------------------------------------------
# passes/tracing.py: fallbacks
# ---------------------------------------------------------------------------------------------

def test_eleven_untraceable_blocks_of_a_sequential_each_fall_back():
    """A Sequential of 11 untraceable blocks traces (child "10" is not inside "1") with 11 fallbacks."""
    model = nn.Sequential(*[DataBranch() for _ in range(11)])
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=trace(model)), daemon=True)
    worker.start()
    worker.join(60)  # a generous limit: the trace must return, not loop forever
    assert not worker.is_alive(), "trace() did not return within 60 s"
    assert sorted(fallback_names(out["r"]), key=int) == [str(i) for i in range(11)]


class CheckpointSeq(nn.Module):
    """timm's checkpoint_seq: the blocks of a Sequential checkpointed one by one."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x):
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False)
        return x


def test_blocks_checkpointed_one_by_one_each_get_a_graph():
    """Blocks a forward checkpoints one by one get a graph each, not one graph over their Sequential."""
    r = trace(CheckpointSeq().train())
    assert fallback_names(r) == [""]
    assert "blocks" not in r.graphs
    assert {"blocks.0", "blocks.1"} <= set(r.graphs)


def test_a_split_root_is_reported_as_chosen_not_untraceable():
    """trace(split=...) reports the root's fallback as the caller's choice."""
    r = trace(Block(), split="one graph would not serve all calls")
    assert [(f.name, f.chosen) for f in r.fallbacks] == [("", True)]


def test_a_model_on_meta_traced_with_an_example_record_gets_one_graph():
    """A model built on the meta device (no weights to check the graph against) is traced whole."""
    with torch.device("meta"):
        model = TwoBlocks()
    x = torch.randn(2, 4, device="meta")
    r = trace(model.train(), calls=CallRecord(model, (x,)))
    assert fallback_names(r) == []
    assert list(r.graphs) == [""]


class Warns(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        warnings.warn("child says hello")
        return self.lin(x)


class UntraceableParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Warns()
        self.b = Warns()

    def forward(self, x):
        if x.sum() > 0:
            return self.b(self.a(x))
        return -self.b(self.a(x))


def test_warnings_of_children_traced_alone_are_reported_once():
    """A warning raised while tracing children under an untraceable parent is reported, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trace(UntraceableParent())
    assert fallback_names(r) == [""]
    assert r.warnings == ["UserWarning: child says hello"]


class Asserting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        assert x.shape[-1] <= 16, "too wide"
        return self.fc(x)


class WithAssert(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Asserting()

    def forward(self, x):
        return self.block(x).relu()


def test_an_assert_in_a_child_does_not_make_it_fall_back():
    """A shape assert inside a child module is traced through: the model gets one whole graph."""
    model = WithAssert()
    r = trace(model)
    assert fallback_names(r) == []
    assert "block.fc" in [n.target for n in r.module.graph.nodes if n.op == "call_module"]
    x = torch.randn(2, 8)
    assert torch.allclose(r.module(x), model(x))


class HfEncoder(nn.Module):
    """transformers' gradient checkpointing: a partial of checkpoint stored on the module."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def forward(self, x):
        return self._gradient_checkpointing_func(self.lin, x)


class HfModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = HfEncoder()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_a_checkpoint_partial_on_a_child_makes_that_child_fall_back():
    """A child holding _gradient_checkpointing_func = partial(checkpoint) runs its own forward."""
    r = trace(HfModel().train())
    assert fallback_names(r) == ["encoder"]
    assert "checkpoint" in r.fallbacks[0].reason


def test_a_checkpoint_helper_imported_after_a_first_trace_is_refused():
    """A helper module calling checkpoint, imported after an earlier trace, is still refused."""
    with refuse_checkpoint(nn.Linear(1, 1)):  # scans the imported modules once
        pass
    helper = types.ModuleType("late_ckpt_helper")
    exec("from torch.utils.checkpoint import checkpoint\n"
         "def run(f, x):\n    return checkpoint(f, x, use_reentrant=False)\n", helper.__dict__)
    sys.modules["late_ckpt_helper"] = helper

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return helper.run(self.lin, x)
    try:
        r = trace(Net().train())
    finally:
        del sys.modules["late_ckpt_helper"]
    assert fallback_names(r) == [""]


# ---------------------------------------------------------------------------------------------
# passes/mode_branches.py, passes/mistraced.py
# ---------------------------------------------------------------------------------------------

class EvalBranches(nn.Module):
    """Its eval branch cannot be traced (a data-dependent condition)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if self.training:
            return self.lin(x)
        if x.sum() > 0:
            return -self.lin(x)
        return self.lin(x) * 3


def test_an_untraceable_eval_branch_is_not_served_by_the_training_graph():
    """A model traced in training whose eval branch cannot be traced computes its eval forward in eval."""
    model = EvalBranches().train()
    x = torch.ones(2, 4)
    r = trace(model)
    r.module.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(r.module(x), EvalBranches.forward(model, x))


class TwoLayoutCalls(nn.Module):
    def forward(self, x):
        return x.contiguous().contiguous().relu()


class NoLayoutCall(nn.Module):
    def forward(self, x):
        return x.relu()


def test_chained_layout_calls_are_all_taken_out_of_the_graph_key():
    """x.contiguous().contiguous().relu() compares equal to x.relu() (a layout-only training branch)."""
    assert graph_key(fx.symbolic_trace(TwoLayoutCalls()).graph) == graph_key(fx.symbolic_trace(NoLayoutCall()).graph)


class Mistraced(nn.Module):
    """isinstance on a traced value: the graph takes the other branch than the forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x if isinstance(x, torch.Tensor) else torch.sin(x))


class DictHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"a": Mistraced(), "b": Block()})
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.blocks["b"](self.blocks["a"](x)))


def test_a_mistraced_block_in_a_moduledict_costs_only_that_block():
    """A block in a ModuleDict whose graph computes something else falls back alone."""
    model = DictHolder().train()
    x = torch.randn(2, 4)
    r = trace(model, calls=CallRecord(model, (x,)))
    assert fallback_names(r) == ["blocks.a"]
    assert torch.allclose(r.module(x), model(x))


class ModeAct(nn.Module):
    """Branches on self.training before its activation, and holds a layer a rule rewrites."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(x) if self.training else self.lin(x) * 2)


def test_a_mode_branching_module_holding_a_rewritten_layer_stays_in_the_graph():
    """A mode-branching module that holds a layer is_site rewrites is not split off to run as it is."""
    r = trace(nn.Sequential(nn.Linear(4, 4), ModeAct()).train(), is_site=lambda name, m: isinstance(m, nn.Linear),
              shell=lambda name, m: isinstance(m, nn.ReLU))
    assert fallback_names(r) == []
    assert r.direct == []
    assert "1.lin" in [n.target for n in r.module.graph.nodes if n.op == "call_module"]


# ---------------------------------------------------------------------------------------------
# passes/export_guard.py: graphs captured by torch.export
# ---------------------------------------------------------------------------------------------

class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.lin(x)
        return y if mask is None else y * mask


def test_an_exported_graph_does_not_drop_an_argument_its_example_left_out():
    """model(x, mask=m) on a graph exported from (x,) applies the mask."""
    model = Masked().train()
    x = torch.randn(2, 4)
    r = export_trace(model, (x,))
    mask = torch.zeros(2, 4)
    with torch.no_grad():
        assert torch.allclose(r.module(x, mask=mask), model(x, mask=mask))
        assert torch.allclose(r.module(x), model(x))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale: float):
        return self.lin(x) * scale


def test_an_exported_graph_serves_only_its_python_scalar_without_its_checks():
    """With torch.export's checks gone (a pickle), another Python scalar runs the forward."""
    model = Scaled().train()
    x = torch.randn(2, 4)
    r = export_trace(model, (x, 1.0))
    r.module._call_guard.checks = None  # what pickling leaves
    with torch.no_grad():
        assert torch.allclose(r.module(x, 3.0), model(x, 3.0))
        assert torch.allclose(r.module(x, 1.0), model(x, 1.0))


class TrainingNoise(nn.Module):
    """Draws noise only in training (scaled by a buffer that is zero when exported)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("noise", torch.zeros(()))

    def forward(self, x):
        y = self.lin(x)
        if self.training:
            y = y + torch.rand_like(y) * self.noise
        return y


def test_an_exported_graph_drawing_random_numbers_only_in_training_does_not_serve_eval():
    """Eval calls of a graph whose training branch draws noise run the eval forward (no noise)."""
    model = TrainingNoise().train()
    x = torch.randn(2, 4)
    r = export_trace(model, (x,))
    assert any("eval calls run the module's own forward" in n for n in r.notes)
    model.noise.fill_(1.0)
    r.module.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(r.module(x), model(x))
