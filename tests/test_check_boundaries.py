"""The edges of the checks that say something to the user: tolerances, counts and name prefixes
where one step further the other way would say the wrong thing (or nothing)."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify.core.keep import guarded_thresholds, warn_short
from sparsify.deploy.compare import outputs_close
from warned import said


# ---------------------------------------------------------------------------------------------
# sparsify.core.keep
# ---------------------------------------------------------------------------------------------

def test_a_five_point_shortfall_of_the_target_is_warned():
    """A magnitude run that reached 85% where the recipe asks 90% must say so, not pass as
    within rounding of the target."""
    mask = torch.ones(1000, dtype=torch.bool)
    mask[:850] = False  # 85% pruned
    msgs = said(warn_short, "magnitude", {"fc": mask}, 0.9, set())
    assert len(msgs) == 1 and "reached 85.0% sparsity where its target is 90.0%" in msgs[0]


def test_held_at_min_density_names_only_layers_the_floor_held():
    """A layer whose share of the global threshold exactly fills its floor is pruned by the
    global threshold, not held: held_at_min_density must not name it."""
    vals = [torch.tensor([5.0, 11.0, 10.0]),
            torch.tensor([7.5, 2.5, 5.5, 4.5, 11.5, 9.5, 6.5, 0.5, 8.5])]
    taus, capped = guarded_thresholds(vals, 0.45, 0.35)
    assert capped == []
    assert taus[0] == taus[1]  # one global threshold
    assert [int((v <= t).sum()) for v, t in zip(vals, taus)] == [1, 4]


# ---------------------------------------------------------------------------------------------
# sparsify.core.pace
# ---------------------------------------------------------------------------------------------

def test_penalty_records_are_freed_after_two_optimizer_steps_without_sparsify_step():
    """Without sparsify.step, each forward's tl1 penalty record (and its autograd graph) stayed
    alive one iteration longer than needed, and was not counted as never collected."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = sparsify.sparsify(net, "tl1", example_inputs=torch.randn(1, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # a whole iteration without sparsify.step, twice
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    group = next(iter(model.sparsify_state.groups.values()))
    assert sum(len(m.records) for m in group.members.values()) == 0
    assert group.uncollected == 2
    assert any("never collected" in w for w in group.warnings())


def test_a_step_per_micro_batch_under_two_batch_accumulation_is_told():
    """sparsify.step after each of 2 micro-batches runs the schedules twice as fast: 10 of 20
    calls followed no optimizer step, which is half, and must be warned."""
    torch.manual_seed(0)
    model = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "gmp", total_steps=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loop():
        for i in range(40):
            model(torch.ones(1, 4)).sum().backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
            sparsify.step(model)

    idle = [m for m in said(loop) if "sparsify.step calls followed no optimizer step" in m]
    assert len(idle) == 1 and idle[0].startswith("sparsify: 10 of the last 20 sparsify.step calls")


def test_finalize_one_step_before_the_ramp_end_says_two_different_sparsities():
    """Stopping one step before gmp's ramp ends leaves the model short of its target: finalize
    must say so, with numbers that differ (not "at sparsity 0.9 of its final 0.9")."""
    torch.manual_seed(0)
    model = sparsify.sparsify(nn.Sequential(nn.Linear(8, 8)), "gmp", total_steps=100,
                              example_inputs=torch.randn(2, 8))  # ramp: steps 5..50
    for _ in range(49):
        sparsify.step(model)
    msgs = [m for m in said(sparsify.finalize, model) if "of its final" in m]
    assert len(msgs) == 1 and msgs[0].startswith("sparsify.finalize: at step 49 the gmp schedule")
    now, final = re.search(r"at sparsity (\S+) of its final ([^\s,]+),", msgs[0]).groups()
    assert now != final and float(now) < float(final) == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------
# sparsify.deploy.compare and finalize
# ---------------------------------------------------------------------------------------------

def test_outputs_near_zero_are_held_to_the_absolute_tolerance():
    """An output that should be 0 but is 5e-5 (five times atol) must not pass finalize's check."""
    ok, worst = outputs_close(torch.zeros(3), torch.full((3,), 5e-5))
    assert ok is False and worst == pytest.approx(5e-5)


class TwoHeads(nn.Module):
    """Token ids in; a prediction and a learned prior, the same for every sample, out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 3)
        self.prior = nn.Parameter(torch.ones(3))

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1)), self.prior.expand(ids.shape[0], 3)


def test_a_constant_second_output_is_not_a_model_that_ignores_its_input():
    """A token model with one constant head besides an input-dependent one was told at finalize
    that it "does not depend on its input"."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    model = sparsify.sparsify(TwoHeads(), "gmp", total_steps=10, example_inputs=(ids,))
    for _ in range(10):
        sparsify.step(model)
    msgs = said(sparsify.finalize, model)
    assert not any("does not depend on its input" in m for m in msgs), msgs
    out = model.eval()(ids)[0]
    assert not torch.equal(out[0], out[1])  # the first head does tell the samples apart


def test_a_layer_frozen_before_sparsify_stays_frozen_after_finalize():
    """finalize made every parameter trainable again, so fine-tuning the deployed model also
    trained the backbone the user had frozen."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    net[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen layers left dense; a pruned output row
        model = sparsify.sparsify(net, "gmp", total_steps=10, example_inputs=torch.randn(2, 8))
        for _ in range(10):
            sparsify.step(model)
        final = sparsify.finalize(model)
    grads = {n: p.requires_grad for n, p in final.named_parameters()}
    assert grads == {"0.weight": False, "0.bias": False, "2.weight": True, "2.bias": True}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


class Untraceable(nn.Module):
    """Graphs ``b1`` and ``b100``: "b100.act_tl1" cut after ``len("b1.")`` is "0.act_tl1", a node
    of ``b1``'s graph (its block ``0`` is traced into it)."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(Block())
        self.b100 = Block()

    def forward(self, x):
        y = self.b1(x)
        if y.sum() > -1e9:  # data-dependent: the root is not traced
            y = self.b100(y)
        return y


def test_finalize_removes_each_regularizer_from_its_own_graph_not_a_sibling_with_a_shorter_name():
    """With sibling graphs b1 and b100, finalize removed b100's regularizer from b1's graph
    (wrong node), so the deployed model failed to finalize or kept a regularizer."""
    torch.manual_seed(0)
    recipe = {"version": 1, "name": "two", "rules": [  # b100's group first: its node is removed first
        {"match": {"name": "b100.act"}, "method": "tl1"},
        {"match": {"name": "b1.0.act"}, "method": "tl1", "params": {"lam": 0.2}}]}
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the root is not traced
        model = sparsify.sparsify(Untraceable(), recipe, example_inputs=x)
    assert model.sparsify_state.graph_paths == ["b1", "b100"]
    assert [list(g.members) for g in model.sparsify_state.groups.values()] == [["b100.act_tl1"], ["b1.0.act_tl1"]]
    final = sparsify.finalize(model)
    names = [n for n, _ in final.named_modules()]
    assert not any(n.endswith("_tl1") for n in names), names
    assert torch.equal(final(x), model.eval()(x))


class Attention(nn.Module):
    """Two attentions, one with separate q/k/v projections (kdim, vdim), and a head."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True, kdim=4, vdim=4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x, y):
        return self.fc(self.mha(x, x, x)[0] + self.cross(x, y, y)[0])


@pytest.mark.parametrize("frozen", [("mha.in_proj_weight",), ("cross.q_proj_weight", "cross.v_proj_weight")])
def test_a_frozen_attention_projection_stays_frozen_after_finalize(frozen):
    """An attention input projection frozen before sparsify is frozen after finalize, the others trainable
    (the sparse model names it in_proj.weight, the plain one in_proj_weight: finalize made it trainable)."""
    torch.manual_seed(0)
    net = Attention()
    for name in frozen:
        net.get_parameter(name).requires_grad_(False)
    inputs = (torch.randn(2, 5, 8), torch.randn(2, 5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen layers left dense
        model = sparsify.sparsify(net, "gmp", total_steps=4, example_inputs=inputs)
        final = sparsify.finalize(model.eval())
    grads = {n: p.requires_grad for n, p in final.named_parameters()}
    assert {n for n, g in grads.items() if not g} == set(frozen)
    assert grads["cross.k_proj_weight"] and grads["fc.weight"]
