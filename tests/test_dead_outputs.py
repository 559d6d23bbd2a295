"""Output rows of the last layer that a weight method pruned whole are said at the run's last
step and at finalize: a ViT head under the default st3 kept 3 of its 10 classes (the others were
their bias alone, the same for every input), and nothing said so."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from warned import said as messages_of

SAID = "outputs pruned (rows"


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[4].weight[:4] *= 1e-4  # four classes with small weights: a global threshold takes them whole
    return model


def run(recipe, model=None, **overrides):
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    m = sparsify.sparsify(model or net(), recipe, total_steps=4, example_inputs=x[:1], **overrides)
    opt = torch.optim.SGD(sparsify.param_groups(m), lr=1e-6)
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            loss = F.cross_entropy(m(x), y) + sparsify.penalty(m)
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m)
        said.append([str(w.message) for w in caught if SAID in str(w.message)])
        caught.clear()
        sparsify.finalize(m)
        said.append([str(w.message) for w in caught if SAID in str(w.message)])
    return said


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_pruned_classes_are_said_at_the_last_step_and_at_finalize(recipe):
    at_step, at_finalize = run(recipe, begin=0, end=2, sparsity=0.8)
    for said in (at_step, at_finalize):
        assert len(said) == 1 and "4: every weight of 4 of its 10 outputs pruned (rows 0, 1, 2, 3)" in said[0], said
    assert at_step[0].startswith("sparsify.step") and at_finalize[0].startswith("sparsify.finalize")


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_pruned_classes_are_said_where_the_masks_are_fixed_in_a_run_without_total_steps(recipe):
    """No total_steps: the run's last step is unknown, so the step that fixes the masks (from then on
    a dead row stays dead) says it, not finalize alone (torchvision's zero-initialised ViT head
    lost 6 of its 10 classes at a custom recipe's fix step, said only at finalize)."""
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    m = sparsify.sparsify(net(), recipe, example_inputs=x[:1], begin=0, end=2, fix=3, sparsity=0.8)
    opt = torch.optim.SGD(sparsify.param_groups(m), lr=1e-6)
    at = {}
    for t in range(1, 6):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        at[t] = [s for s in messages_of(sparsify.step, m) if SAID in s]
    assert [t for t, s in at.items() if s] == [3], at
    assert "4: every weight of 4 of its 10 outputs pruned (rows 0, 1, 2, 3)" in at[3][0]


def test_a_dense_last_layer_and_an_nm_one_are_not_said():
    keep_last = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3", "params": {"sparsity": 0.8}},
                                         {"match": {"last": True}, "method": None}]}
    assert run(keep_last) == [[], []]
    assert run("nm-2-4") == [[], []]  # N:M keeps half of every row


class _PaddedLM(nn.Module):
    """An embedding with a padding row, tied to the LM head (RoBERTa's, BART's, Gemma's pad token:
    nn.Embedding zeroes that row and never updates it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(10, 16, padding_idx=1), nn.Linear(16, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            self.emb.weight[6] *= 1e-4  # a token a global threshold takes whole

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.emb(ids))))


def test_a_tied_heads_padding_row_is_not_said_pruned():
    """The padding row is zero by the embedding's design, not pruned: not said; a row the
    threshold took is."""
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))
    m = sparsify.sparsify(_PaddedLM(), "gmp", total_steps=2, begin=0, end=0, sparsity=0.3, example_inputs=ids[:1])
    opt = torch.optim.SGD(sparsify.param_groups(m), lr=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = F.cross_entropy(m(ids).flatten(0, 1), ids.flatten())
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m)
        sparsify.finalize(m)
    said = [str(w.message) for w in caught if SAID in str(w.message)]
    assert len(said) == 2 and all("head: every weight of 1 of its 10 outputs pruned (rows 6)" in s for s in said), said


@pytest.mark.parametrize("recipe", ["gmp", "dual", "str"])
def test_a_grouped_conv_transpose_as_the_last_layer_is_looked_at(recipe):
    """A grouped ConvTranspose's output channel o of group g reads weight[g*in/g:(g+1)*in/g, o - g*out/g]:
    the look for dead outputs reads it there (it raised 'a ConvTranspose with groups=2 has no
    (out, in, ...) view of its weight' in sparsify.step and finalize)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(16, 8, 4, stride=2, groups=2))
    with torch.no_grad():
        model[2].weight[8:, 1] *= 1e-4  # group 1's second output: channel 4 + 1
    x = torch.randn(2, 8, 6, 6)
    m = sparsify.sparsify(model, recipe, total_steps=4, example_inputs=(x,),
                          **({} if recipe == "str" else {"sparsity": 0.6}))
    opt = torch.optim.SGD(sparsify.param_groups(m), lr=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            loss = m(x).square().mean() + sparsify.penalty(m)
            opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m, loss)
        sparsify.finalize(m)
    dead = [str(w.message) for w in caught if SAID in str(w.message)]
    if recipe == "gmp":  # a global magnitude threshold takes the small channel whole
        assert dead and all("2: every weight of 1 of its 8 outputs pruned (rows 5)" in s for s in dead), dead


def test_rows_of_a_hidden_layer_pruned_whole_are_not_said():
    """Hidden layers' dead channels are structured sparsity: only the last layer's rows are classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight[:4] *= 1e-4  # four hidden channels a global threshold takes whole
    assert run("gmp", model, begin=0, end=2, sparsity=0.8) == [[], []]
