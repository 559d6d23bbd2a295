"""Forwards that ask a traced value what torch.fx cannot answer (passes/example_values.py,
passes/proxy_reads.py, passes/raise_branches.py): ``*x.shape`` and ``len(x.shape)`` (the rank, taken
from the example inputs and guarded), ``torch.finfo(x.dtype)`` (read when the graph runs),
``callable(x)``, and conditions whose other branch raises (``assert``, an input check). Each used to
make its module run its own forward, without the nodes a recipe inserts there."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings, strategies as st
from torch import nn

import sparsify
from loops import run_steps


def _plan_of(m):
    return sparsify.core.state.find_state(m).plan


def default(value, otherwise):
    """lucidrains' helper: ``otherwise()`` when it is a function."""
    return value if value is not None else (otherwise() if callable(otherwise) else otherwise)


class Attention(nn.Module):
    """Causal attention written as vit-pytorch / x-transformers write it."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        b, n, _, h = *x.shape, self.heads
        context = default(context, x)
        q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in self.qkv(context).chunk(3, dim=-1))
        i, j = *q.shape[-2:-1], k.shape[-2]
        sim = q @ k.transpose(-1, -2)
        mask = torch.ones((i, j), dtype=torch.bool, device=x.device).triu(1)
        sim = sim.masked_fill(mask, -torch.finfo(sim.dtype).max)
        y = (sim.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.out(nn.functional.gelu(y))


class PosEmb(nn.Module):
    def __init__(self, dim=16, max_len=8):
        super().__init__()
        self.max_len = max_len
        self.emb = nn.Embedding(max_len, dim)

    def forward(self, x):
        return x + self.emb(torch.arange(x.shape[1], device=x.device))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = PosEmb()
        self.a, self.b = Attention(), Attention()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        if len(x.shape) != 3:
            raise ValueError("expected (batch, tokens, features)")
        n = x.shape[1]
        assert n <= self.pos.max_len, f"a sequence of {n} is longer than {self.pos.max_len}"
        return self.head(self.b(self.a(self.pos(x))).mean(1))


@pytest.mark.parametrize("recipe", ["tl1", "st3", "str", "dual"])
def test_a_transformer_that_reads_shapes_is_traced_whole(recipe):
    """Before: the root (len of a shape, an assert on a length) and both attention blocks
    (``*x.shape``, finfo of a dtype, callable) ran their own forward."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "could not trace" summary
        m = sparsify.sparsify(model, recipe, total_steps=4, example_inputs=(x,))
    assert _plan_of(m).fallbacks == [] and isinstance(m, fx.GraphModule)
    targets = [n.target for n in m.graph.nodes]
    assert torch.finfo in targets and torch._assert in targets
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-2)
    run_steps(m, opt, [(x, None)] * 3, penalty=True, loss_of=lambda x, _: m(x).pow(2).mean())
    final = sparsify.finalize(m)
    m.eval()
    other = torch.randn(3, 7, 16)  # another batch and length: the graph read them, not the example's
    with torch.no_grad():
        torch.testing.assert_close(final(other), m(other), rtol=1e-4, atol=1e-5)


def test_the_dtype_is_read_when_the_graph_runs():
    """``-torch.finfo(sim.dtype).max`` under bf16 autocast is bf16's: a value baked at trace time
    (float32's) overflows bf16 and masked_fill raises."""
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 16)
    m = sparsify.sparsify(model, "st3", total_steps=4, example_inputs=(x,)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = m(x), model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


def test_a_failed_check_still_fails():
    """An assert and an input check the trace went past are checked when the graph runs."""
    m = sparsify.sparsify(Net(), "tl1", total_steps=4, example_inputs=(torch.randn(2, 5, 16),))
    with pytest.raises(AssertionError, match="raises at .*test_shape_reads.py"):
        m(torch.randn(2, 9, 16))  # longer than the positional embedding
    with pytest.raises(AssertionError, match="3-dimensional"):
        fx.GraphModule(m, m.graph)(torch.randn(2, 5, 16, 1))  # the graph alone, without its CallGuard


def test_inputs_of_another_rank_run_the_own_forward():
    """The rank came from the example: a call with another rank goes to the module's own forward
    (and says that it skips the nodes the recipe inserted there), where the original would."""
    torch.manual_seed(0)
    block = Attention()
    m = sparsify.sparsify(Attention(), "tl1", total_steps=4, example_inputs=(torch.randn(2, 5, 16),))
    m.load_state_dict(block.state_dict(), strict=False)
    guard = m.__dict__["_call_guard"]
    assert guard.ranks == {"x": 3}
    x4 = torch.randn(2, 5, 16)[None]
    with pytest.raises(Exception):
        block(x4)  # the original does not take it either: both go the same way
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Exception):
        warnings.simplefilter("always")
        m(x4)
    assert any("not traced for" in str(w.message) for w in caught)


class Caught(nn.Module):
    """A check whose exception the forward catches: its other branch does not end the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def check(self, x):
        if x.shape[-1] % 2:
            raise ValueError("odd")

    def forward(self, x):
        try:
            self.check(x)
        except ValueError:
            x = nn.functional.pad(x, (0, 1))
        return self.conv(x).relu()


def test_a_raise_that_the_forward_catches_is_not_taken_as_a_check():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(Caught(), "tl1", example_inputs=(torch.randn(2, 3, 8, 8),), capture="fx")
    assert [f["name"] for f in plan.fallbacks] == [""]


class Flatten(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, 4)

    def forward(self, x):
        b, *rest = x.shape
        return self.proj(torch.relu(x.reshape(b, -1)))


@settings(max_examples=12, deadline=None)
@given(rank=st.integers(2, 5), other=st.integers(2, 5), batch=st.integers(1, 4),
       recipe=st.sampled_from(sorted(sparsify.builtin_recipes())))
def test_a_rank_read_from_the_example_serves_every_call_of_that_rank(rank, other, batch, recipe):
    """Traced at one rank, the sparse model answers another batch of that rank from its graph as
    the module's own forward does (same layers; eval, where no method changes the function between
    the two), and inputs of another rank from its own forward, without the graph's assertion.
    Every built-in recipe (semi-structured matches no Linear and leaves the model as it is)."""
    torch.manual_seed(rank * 10 + other)
    width = 4

    def of_rank(r, b):
        return torch.randn((b,) + (1,) * (r - 2) + (width,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(Flatten(width), recipe, total_steps=4, example_inputs=(of_rank(rank, 2),)).eval()
        assert _plan_of(m).fallbacks == []
        own = m.__dict__["_call_guard"]
        assert own.ranks == {"x": rank}
        with torch.no_grad():
            for x in (of_rank(rank, batch), of_rank(other, batch)):
                torch.testing.assert_close(m(x), own.forward(m, x), rtol=1e-5, atol=1e-6)


class CrossAttend(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)

    def forward(self, x, context=None):
        k, v = self.kv(default(context, x)).chunk(2, dim=-1)
        return nn.functional.gelu((self.q(x) @ k.transpose(-1, -2)).softmax(-1) @ v)


class PreNorm(nn.Module):
    """vit-pytorch's / CaiT's wrapper: passes on whatever keywords it gets."""

    def __init__(self, fn, dim=16):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class Decoder(nn.Module):
    """Its own forward branches on a size, so each block is traced on its own, ``**kwargs`` a
    traced argument."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([PreNorm(CrossAttend()), PreNorm(CrossAttend())])

    def forward(self, x, context=None):
        for block in self.blocks:
            x = x + block(x, context=context)
        return x[:, :1] if x.shape[1] % 2 else x


def test_keyword_arguments_passed_on_are_traced_with_the_example_keys():
    """Before: ``**kwargs`` of a block traced on its own could not be unpacked, and every block
    ran its own forward. The keys the example passed are traced; a call passing others (here:
    none) runs the block's own forward."""
    torch.manual_seed(0)
    model, x, ctx = Decoder(), torch.randn(2, 4, 16), torch.randn(2, 3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "tl1", total_steps=4, example_inputs=(x, ctx), copy=True)
    assert [f["name"] for f in _plan_of(m).fallbacks] == [""]  # the root only
    guard = m.blocks[0].__dict__["_call_guard"]
    assert guard.var_keys == {"context"}
    m.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x, ctx), model(x, ctx))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.testing.assert_close(m(x), model(x))  # context=None: the blocks' own forward
    assert guard.fits((x,), {"context": ctx}) and guard.fits((x,), {"context": None}) is False


class TokensOrImage(nn.Module):
    """Takes tokens (b, n, d) or an image (b, d, h, w), as many vision-transformer blocks do."""

    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        return torch.relu(self.fc(x))


def test_a_condition_on_the_rank_takes_the_examples_branch_and_guards_it():
    torch.manual_seed(0)
    model = TokensOrImage()
    image, tokens = torch.randn(2, 8, 3, 3), torch.randn(2, 9, 8)
    m = sparsify.sparsify(model, "tl1", total_steps=4, example_inputs=(image,), copy=True)
    assert _plan_of(m).fallbacks == [] and m.__dict__["_call_guard"].ranks == {"x": 4}
    assert "flatten" in [n.target for n in m.graph.nodes]  # the image branch, traced
    m.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(image), model(image))
        torch.testing.assert_close(m(tokens), model(tokens))  # rank 3: the module's own forward


class Checked(nn.Module):
    """Raises on inputs longer than ``limit`` (through an assert or an explicit raise)."""

    def __init__(self, limit: int, style: str):
        super().__init__()
        self.limit, self.style = limit, style
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = x.shape[1]
        if self.style == "assert":
            assert n <= self.limit, f"{n} > {self.limit}"
        elif self.style == "raise":
            if n > self.limit:
                raise ValueError(f"{n} > {self.limit}")
        else:  # the check sits in an `or`, as segmentation_models_pytorch's does
            if n > self.limit or x.shape[2] != 4:
                raise RuntimeError("bad input")
        return torch.relu(self.fc(x)).mean(1)


@settings(max_examples=20, deadline=None)
@given(limit=st.integers(1, 6), example=st.integers(1, 6), other=st.integers(1, 8),
       style=st.sampled_from(["assert", "raise", "or"]))
def test_a_traced_check_fails_exactly_where_the_forward_does(limit, example, other, style):
    """Traced on an example that passes the check, the graph holds no branch for it and raises on
    exactly the inputs the module's own forward raises on; elsewhere it computes the same."""
    example = min(example, limit)
    model = Checked(limit, style)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "tl1", total_steps=4, example_inputs=(torch.randn(2, example, 4),), copy=True)
    assert _plan_of(m).fallbacks == []
    m.eval(), model.eval()
    x = torch.randn(3, other, 4)
    if other > limit:
        with pytest.raises(Exception):
            model(x)
        with pytest.raises(AssertionError, match="raises at .*test_shape_reads.py"):
            m(x)
    else:
        with torch.no_grad():
            torch.testing.assert_close(m(x), model(x))
