"""Models written with einops, as lucidrains' vit-pytorch, x-transformers and their kin are: its
functions and layers could not be traced (einops rejects a torch.fx proxy), nor could
``map(f, x.chunk(3, -1))``, so the root and every attention block ran their own forward
(passes/library_leaves.py, docs/capture.md)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from passes.mistraced import NOT_REPRODUCED

einops = pytest.importorskip("einops", reason="einops is a dev extra (pip install -e '.[dev]')")
from einops import rearrange, repeat  # noqa: E402
from einops.layers.torch import Rearrange  # noqa: E402


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return self.to_out(rearrange(attn @ v, "b h n d -> b n (h d)"))


class TinyViT(nn.Module):
    """A vision transformer the way vit-pytorch writes one: patches by ``Rearrange``, the class
    token by ``repeat``, heads by ``rearrange`` of a chunked projection."""

    def __init__(self, dim=32, depth=2, heads=4, patch=4, size=16, classes=10):
        super().__init__()
        flat = patch * patch * 3
        self.to_patch = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                      nn.LayerNorm(flat), nn.Linear(flat, dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([
            nn.ModuleList([Attention(dim, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))])
            for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.to_patch(img)
        b, n, _ = x.shape
        x = torch.cat((repeat(self.cls, "1 1 d -> b 1 d", b=b), x), dim=1) + self.pos[:, : n + 1]
        for attn, ff in self.blocks:
            x = attn(x) + x
            x = ff(x) + x
        return self.head(x[:, 0])


@pytest.mark.parametrize("recipe", ["st3", "tl1", "nm-2-4"])
def test_an_einops_vit_is_traced_whole_trains_and_finalizes(recipe):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = TinyViT()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "could not trace" summary
        m = sparsify.sparsify(model, recipe, total_steps=4, example_inputs=(x,))
    plan = sparsify.core.state.find_state(m).plan
    assert plan.fallbacks == [] and isinstance(m, torch.fx.GraphModule)
    targets = {n.target for gm in m.modules() if isinstance(gm, torch.fx.GraphModule) for n in gm.graph.nodes}
    assert repeat in targets  # einops runs as one call, on real tensors
    assert (rearrange in targets) == (recipe != "tl1")  # tl1 needs no graph of an attention block
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-2)
    for _ in range(4):
        loss = nn.functional.cross_entropy(m(x), torch.tensor([1, 2])) + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)
    final = sparsify.finalize(m)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(final(x), m(x), rtol=1e-4, atol=1e-5)


class Gated(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 2 * width)

    def forward(self, x):
        return sum(map(torch.relu, self.proj(x).chunk(2, dim=-1)))


def test_the_pieces_of_a_chunk_can_be_iterated_and_a_wrong_count_is_caught():
    """``chunk(2)`` gives two pieces unless the dimension is too small for them: then the graph
    (which takes two) fails on the example inputs and the module runs its own forward."""
    torch.manual_seed(0)
    ok = sparsify.plan(Gated(4), "tl1", example_inputs=(torch.randn(2, 4),))
    assert ok.fallbacks == [] and [e.kind for e in ok.rewritten] == ["relu", "relu"]
    narrow = Gated(4)
    narrow.proj = nn.Linear(4, 1)  # one feature: chunk(2) returns a single piece
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(narrow, "tl1", example_inputs=(torch.randn(2, 4),), capture="fx")
        auto = sparsify.plan(narrow, "tl1", example_inputs=(torch.randn(2, 4),))
    assert [(f["name"], f["reason"]) for f in plan.fallbacks] == [("", NOT_REPRODUCED)]
    # torch.export, which runs the forward on the real shapes, reaches the one relu there is
    assert [c["capture"] for c in auto.captures] == ["torch.export"] and [e.kind for e in auto.rewritten] == ["relu"]
