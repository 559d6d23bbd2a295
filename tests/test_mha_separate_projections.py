"""``nn.MultiheadAttention`` with separate q/k/v projections (``kdim`` / ``vdim`` other than
``embed_dim``: cross-attention) is sparsified like the packed one.

Its ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` are read inside
``F.multi_head_attention_forward``, never through a module call: the plan listed them as "read by
their own kernel", counted them towards the fused-kernel warning, and left even ``out_proj``
dense. The attention is now a ``SparseMultiheadAttention`` with Linear children ``q_proj`` /
``k_proj`` / ``v_proj``, finalized back into torch's class; MACs count the key and value
projections on the key and value tokens, not the query's."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin
from sparsify.prepare.hidden import SparseMultiheadAttention
from sparsify.prepare.plan import OWN_KERNEL
from sparsify.stats.macs import dense_macs

E, KDIM, VDIM, LQ, LK = 16, 12, 10, 3, 5  # query length 3, key / value length 5
PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
RECIPES = ["st3", "gmp", "nm-2-4", "str", "dual"]
STARTS_EQUAL = {"st3", "gmp", "dual"}  # nm-2-4 masks at step 0, str's soft threshold starts above 0


class Cross(nn.Module):
    """Queries of width 16 attend to keys of width 12 and values of width 10; batch-first inputs
    either way, as the library's example inputs are."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, kdim=KDIM, vdim=VDIM, batch_first=batch_first)
        self.head = nn.Linear(E, 4)

    def forward(self, q, k, v):
        if not self.attn.batch_first:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        out = self.attn(q, k, v)[0]
        return self.head(out if self.attn.batch_first else out.transpose(0, 1)).mean(1)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, width, generator=g) for n, width in ((LQ, E), (LK, KDIM), (LK, VDIM)))


ARGS = inputs()


def build(recipe, batch_first=True, **kw):
    torch.manual_seed(0)
    net = Cross(batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedules at step 0, the activation rule of dual matching nothing
        return net, sparsify.sparsify(net, recipe, total_steps=4, example_inputs=ARGS, **kw)


def train(m, steps=3):
    opt = torch.optim.SGD(sparsify.param_groups(m, weight_decay=1e-4), lr=0.05)
    for _ in range(steps):
        loss = m(*ARGS).pow(2).mean() + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)


def with_effective_weights(net, m):
    """The dense model computing with ``m``'s effective weights."""
    dense = copy.deepcopy(net)
    with torch.no_grad():
        for p in ("q", "k", "v"):
            getattr(dense.attn, f"{p}_proj_weight").copy_(getattr(m.attn, f"{p}_proj_weight"))
        for name in ("attn.out_proj", "head"):
            layer = m.get_submodule(name)
            w = layer.effective_weight() if isinstance(layer, SparseWeightMixin) else layer.weight
            dense.get_submodule(name).weight.copy_(w)
    return dense


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_projections_are_rewritten_and_compute_the_dense_function(recipe, batch_first):
    net, m = build(recipe, batch_first)
    attn = m.attn
    assert isinstance(attn, SparseMultiheadAttention) and attn.in_proj_weight is None
    rows = {r.name for r in sparsify.report(m).layers}
    # N:M groups run along the input: the value's 10 inputs make no groups of 4, the method declines it
    expected = {f"attn.{p}" for p in PROJ if not (recipe == "nm-2-4" and p == "v_proj")}
    assert expected <= rows
    assert all(isinstance(getattr(attn, p), SparseWeightMixin) for p in ("q_proj", "k_proj", "out_proj"))
    assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"} <= set(m.state_dict())
    # the attribute torch's forward reads is the effective weight
    torch.testing.assert_close(attn.q_proj_weight, attn.q_proj.effective_weight())
    with torch.no_grad():
        if recipe in STARTS_EQUAL:
            torch.testing.assert_close(m(*ARGS), net(*ARGS))  # step 0: nothing pruned yet
        torch.testing.assert_close(m(*ARGS), with_effective_weights(net, m)(*ARGS))
    m(*ARGS).pow(2).mean().backward()  # the gradients reach the latent weights (straight through)
    assert all(getattr(attn, p).weight.grad.abs().sum() > 0 for p in PROJ)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("recipe", RECIPES)
def test_trained_then_finalized_is_a_plain_attention_that_computes_the_same(recipe, batch_first):
    _, m = build(recipe, batch_first, **({"begin": 0, "end": 2} if recipe in ("st3", "gmp") else {}))
    train(m)
    attn = m.attn
    assert isinstance(attn, SparseMultiheadAttention) and isinstance(attn.k_proj, SparseWeightMixin)
    if recipe in ("st3", "gmp", "nm-2-4"):  # prunes within these 3 steps
        assert float((attn.k_proj_weight == 0).float().mean()) > 0.3
    m.eval()
    with torch.no_grad():
        sparse_out = m(*ARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", sparsify.FinalizeWarning)  # outputs equal, not explained away
        final = sparsify.finalize(m)
    fa = final.attn
    assert type(fa) is nn.MultiheadAttention and not fa._forward_pre_hooks and fa.in_proj_weight is None
    assert type(fa.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for p in ("q", "k", "v"):
        torch.testing.assert_close(getattr(fa, f"{p}_proj_weight"), getattr(attn, f"{p}_proj_weight").detach())
    # torch's own parameter names and order: a dense model's checkpoint keys
    assert [k for k in final.state_dict() if k.startswith("attn.")] == \
        [k for k in Cross().state_dict() if k.startswith("attn.")]
    with torch.no_grad():  # eval under no_grad: where torch would take its inference fast path
        torch.testing.assert_close(final(*ARGS), sparse_out, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_into_a_fresh_sparsified_model():
    _, m = build("st3", begin=0, end=2)
    train(m)
    _, m2 = build("st3", begin=0, end=2)
    m2.load_state_dict(m.state_dict())
    for p in ("q", "k", "v"):
        torch.testing.assert_close(getattr(m2.attn, f"{p}_proj").weight, getattr(m.attn, f"{p}_proj").weight)
    with torch.no_grad():
        torch.testing.assert_close(m2(*ARGS), m(*ARGS))


def test_a_dense_checkpoint_loads_into_the_sparsified_model():
    net, m = build("st3", begin=0, end=2)
    dense_sd = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    assert "attn.q_proj_weight" in dense_sd
    missing, unexpected = m.load_state_dict(dense_sd, strict=False)
    assert not [k for k in missing if k.endswith(("weight", "bias"))] and not unexpected
    for p in ("q", "k", "v"):
        torch.testing.assert_close(getattr(m.attn, f"{p}_proj").weight, dense_sd[f"attn.{p}_proj_weight"])
    dense = Cross()
    dense.load_state_dict(dense_sd)
    with torch.no_grad():  # step 0 again: the sparsified model is the loaded dense one
        torch.testing.assert_close(m(*ARGS), dense(*ARGS))
    # strict: only the sparsify state is missing (as for any dense checkpoint); the projections load
    with pytest.raises(RuntimeError, match="holds no sparsify state") as info:
        m.load_state_dict(dense_sd)
    assert "Unexpected key" not in str(info.value) and "proj.weight" not in str(info.value)


def test_the_plan_has_no_fused_kernel_entry_and_lists_a_dense_one_as_read_directly():
    """A converted attention has its four projections rewritten, nothing "read by its own
    kernel"; under an activation-only recipe its weights are listed like a packed attention's."""
    class Big(nn.Module):  # the attention is most of the weights: the fused-kernel warning would fire
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 2, kdim=48, vdim=40, batch_first=True)
            self.head = nn.Linear(64, 2)

        def forward(self, q, k, v):
            return self.head(self.attn(q, k, v)[0])

    args = (torch.randn(1, LQ, 64), torch.randn(1, LK, 48), torch.randn(1, LK, 40))
    plan = sparsify.plan(Big(), "st3", total_steps=4, example_inputs=args)
    assert not [e for e in plan.entries if OWN_KERNEL in e.reason]
    assert {f"attn.{p}" for p in PROJ} <= {e.name for e in plan.rewritten} and not plan.dense
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify.sparsify(Big(), "st3", total_steps=4, example_inputs=args)
    # a projection its method declines is listed once, with why (not again as a parameter read directly)
    plan = sparsify.plan(Cross(), "nm-2-4", total_steps=4, example_inputs=ARGS)
    assert [(e.name, e.params) for e in plan.dense] == [("attn.v_proj", E * VDIM)]
    assert "N:M" in plan.dense[0].reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tl1's rule matches no activation here
        plan = sparsify.plan(Big(), "tl1", total_steps=4, example_inputs=args)
    entries = {e.name: e for e in plan.dense}
    for p, width in (("q", 64), ("k", 48), ("v", 40)):
        e = entries[f"attn.{p}_proj_weight"]
        assert e.kind == f"MultiheadAttention.{p}_proj_weight" and e.params == 64 * width
        assert "read directly by nn.MultiheadAttention" in e.reason
    assert not [e for e in plan.entries if OWN_KERNEL in e.reason]
    assert "attn.out_proj" in entries  # inside the dense attention
    assert sum(e.params for e in plan.entries) == sum(p.numel() for n, p in Big().named_parameters()
                                                      if n.endswith("weight"))


def test_macs_count_the_key_and_value_projections_on_their_own_tokens():
    # by hand: each projection's weight times the tokens it is applied to
    q, k, v, out = LQ * E * E, LK * E * KDIM, LK * E * VDIM, LQ * E * E
    head = LQ * E * 4
    net, m = build("st3")
    plan = sparsify.plan(Cross(), "st3", total_steps=4, example_inputs=ARGS)
    macs = {e.name: e.macs for e in plan.entries}
    assert [macs[f"attn.{p}"] for p in PROJ] == [q, k, v, out]
    assert dense_macs(net, ARGS) == q + k + v + out + head
    rows = {r.name: r for r in sparsify.report(m).layers}
    assert [rows[f"attn.{p}"].macs for p in PROJ] == [q, k, v, out]
    # measure watches the function call: the dense model's projections too, each on its own input
    measured = {r.name: r for r in sparsify.measure(net, [ARGS], input_fn=tuple).layers}
    assert [measured[f"attn.{p}"].dense_macs for p in PROJ] == [q, k, v, out]
    # sparse: the multiplies drop with the weights' zeros (the inputs have none)
    _, m = build("gmp", begin=0, end=1)
    train(m, steps=2)
    rows = {r.name: r for r in sparsify.report(m).layers}
    measured = {r.name: r for r in sparsify.measure(m, [ARGS], input_fn=tuple).layers}
    tokens = {"q_proj": LQ, "k_proj": LK, "v_proj": LK, "out_proj": LQ}
    for p, n in tokens.items():
        nnz = int((getattr(m.attn, p).effective_weight() != 0).sum())
        assert nnz < getattr(m.attn, p).weight.numel()
        assert rows[f"attn.{p}"].nonzero_macs == measured[f"attn.{p}"].mult_macs == n * nnz, p


def test_a_packed_cross_attention_counts_its_key_and_value_tokens_too():
    """The packed projection's three row blocks apply to the query, key and value: the plan and
    report counted every block on the query's tokens (3 x 768 here, not 3 x 256 + 2 x 5 x 256),
    measure did not."""
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, 2, batch_first=True)

        def forward(self, q, kv):
            return self.attn(q, kv, kv)[0]

    args = (ARGS[0], torch.randn(2, LK, E))
    expected = (LQ + 2 * LK) * E * E
    plan = sparsify.plan(Packed(), "st3", total_steps=4, example_inputs=args)
    assert next(e.macs for e in plan.entries if e.name == "attn.in_proj") == expected
    assert {r.name: r for r in sparsify.measure(Packed(), [args], input_fn=tuple).layers}["attn.in_proj"].dense_macs \
        == expected


class _DenseAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


def test_the_plan_counts_the_macs_of_a_dense_packed_projection():
    """A dense attention's packed projection is listed as ``mha.in_proj_weight`` and counted as
    ``mha.in_proj``: 5 tokens x 3 x 8 x 8 weights, so the plan's MAC share covers it."""
    rules = {"version": 1, "rules": [{"match": {"name": "fc"}, "method": "st3"}]}
    plan = sparsify.plan(_DenseAttention(), rules, example_inputs=torch.zeros(1, 5, 8))
    macs = {e.name: e.macs for e in plan.entries}
    assert macs == {"fc": 5 * 32, "mha.in_proj_weight": 5 * 192, "mha.out_proj": 5 * 64}
    assert plan.shares()["mac_share"] == pytest.approx(32 / (32 + 192 + 64))
