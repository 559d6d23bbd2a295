"""A sparsified checkpoint loaded with strict=False that lacks some sparse layers' entries (keys a
library renamed: transformers' ViT under Trainer resume) is said: those layers kept a fresh
model's masks at the loaded step, and gmp / dual ended 0.8% sparse of a 90% target, silently."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def trained(recipe, steps=4):
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    m = sparsify.sparsify(net(), recipe, total_steps=8, example_inputs=x[:1])
    opt = torch.optim.SGD(sparsify.param_groups(m), lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(m(x), y) + sparsify.penalty(m)
        opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(m)
    return m


def load(recipe, state):
    fresh = sparsify.sparsify(net(), recipe, total_steps=8, example_inputs=torch.zeros(1, 3, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(state, strict=False)
    return [str(w.message) for w in caught if "holds no entries" in str(w.message)]


@pytest.mark.parametrize("recipe", ["gmp", "st3", "dual", "nm-2-4", "str"])
def test_missing_sparse_layers_are_said(recipe):
    state = trained(recipe).state_dict()
    assert load(recipe, state) == []  # the whole checkpoint: nothing to say
    partial = {k: v for k, v in state.items() if not k.startswith("2.")}
    said = load(recipe, partial)
    assert len(said) == 1 and "at step 4 holds no entries for 1 sparse layer(s) (2;" in said[0], said


def test_a_checkpoint_at_step_0_and_a_dense_one_are_not_this_warning():
    state = trained("gmp", steps=0).state_dict()
    assert load("gmp", {k: v for k, v in state.items() if not k.startswith("2.")}) == []
    assert load("gmp", net().state_dict()) == []  # dense weights: their own message, if any


def test_regularizer_nodes_hold_nothing_to_miss():
    """A regularizer node's only state is whether it is active: a checkpoint without it (transformers'
    renamed ViT keys) named the nodes as layers that would miss their masks and thresholds."""
    state = trained("tl1").state_dict()
    nodes = [k for k in state if "tl1" in k]
    assert nodes
    assert load("tl1", {k: v for k, v in state.items() if k not in nodes}) == []


class SparseFcDenseHead(nn.Module):
    """A sparse ``fc`` beside a dense layer whose path also holds ``fc`` (``head.fc``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(8, 8), nn.ModuleDict({"fc": nn.Linear(8, 4)})

    def forward(self, x):
        return self.head["fc"](torch.relu(self.fc(x)))


def _said_on_load(model, state):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(state, strict=False)
    return [str(w.message) for w in caught if "holds no entries" in str(w.message)]


def test_a_dense_layer_missing_is_not_blamed_on_a_sparse_layer_of_the_same_name():
    """Only the dense head.fc is missing: the sparse fc, all of whose entries loaded, is not said to
    lack them; the same checkpoint loaded through a wrapper (keys under ``net.``) still names a sparse
    layer that is missing."""
    recipe = {"version": 1, "rules": [{"match": {"name": "fc"}, "method": "magnitude",
                                       "params": {"sparsity": 0.5, "begin": 0, "end": 2}}]}

    def model():
        m = sparsify.sparsify(SparseFcDenseHead(), recipe, total_steps=10, example_inputs=torch.zeros(1, 8))
        for _ in range(2):
            sparsify.step(m)
        return m
    state = model().state_dict()
    assert _said_on_load(model(), {k: v for k, v in state.items() if not k.startswith("head.")}) == []
    wrapper = nn.ModuleDict({"net": model()})
    said = _said_on_load(wrapper, {f"net.{k}": v for k, v in state.items() if not k.startswith("fc.")})
    assert len(said) == 1 and "holds no entries for 1 sparse layer(s) (fc;" in said[0], said


class _TiedLM(nn.Module):
    """An embedding tied to the LM head, as transformers' tie_word_embeddings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.emb(ids))))


def _tied_lm(recipe):
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    return sparsify.sparsify(_TiedLM(), recipe, total_steps=8, example_inputs=ids), ids


def _trained_tied(recipe):
    model, ids = _tied_lm(recipe)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(ids).square().mean()
        opt.zero_grad(); loss.backward(); opt.step(); sparsify.step(model)
    return model, ids


@pytest.mark.parametrize("recipe", ["st3", "gmp"])
def test_a_tied_head_left_out_of_a_checkpoint_is_not_said_missing(recipe):
    """transformers leaves a tied head's weight out of save_pretrained folders and Trainer
    checkpoints; the embedding's entry restores it. A non-strict load of such a checkpoint into
    the same sparsify(...) call restores every entry without saying the head is missing; a strict
    one lists the key as torch does for the dense model (the caller's loader may count on it)."""
    model, ids = _trained_tied(recipe)
    saved, held = model.state_dict(), model.state_dict(keep_vars=True)
    tied = [k for k in held if k.startswith("head.") and held[k] is held["emb.weight"]]
    assert tied, sorted(saved)  # the head's weight is one of its keys, the embedding's tensor
    folder = {k: v.clone() for k, v in saved.items() if k not in tied}
    fresh, _ = _tied_lm(recipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fresh.load_state_dict(folder, strict=False)
    assert result.missing_keys == tied
    assert not [w for w in caught if "holds no entries" in str(w.message)]
    model.eval(); fresh.eval()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in saved.items())
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key.*head.weight"):
        _tied_lm(recipe)[0].load_state_dict(folder)


def test_safetensors_load_model_of_a_tied_sparse_model():
    """safetensors' save_model leaves the tied duplicate out and its load_model expects it back in
    missing_keys (HF accelerate's save_state / load_state go through them)."""
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    model, ids = _trained_tied("gmp")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        st.save_model(model, path)
        fresh, _ = _tied_lm("gmp")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            st.load_model(fresh, path)
    assert not [w for w in caught if "holds no entries" in str(w.message)]
    model.eval(); fresh.eval()
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_a_missing_key_tied_to_nothing_loaded_is_still_missing():
    """Only a key whose tensor came in under another name is taken for loaded: without the
    embedding's entry too, the strict load fails and the non-strict one names the head."""
    model, ids = _trained_tied("gmp")
    saved, held = model.state_dict(), model.state_dict(keep_vars=True)
    folder = {k: v for k, v in saved.items() if held[k] is not held["emb.weight"]}
    with pytest.raises(RuntimeError, match="emb.weight"):
        _tied_lm("gmp")[0].load_state_dict(folder)
    fresh, _ = _tied_lm("gmp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(folder, strict=False)
    assert [w for w in caught if "holds no entries for 1 sparse layer(s) (head" in str(w.message)]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_wrappers_prefixed_checkpoint_is_named_so_not_called_dense(prefix):
    """A DDP or torch.compile state_dict (keys under module. / _orig_mod.) was called a checkpoint
    "saved from a model before sparsify()", whose advice, strict=False, then loaded nothing: the
    model stayed at step 0 with no word."""
    state = {prefix + k: v for k, v in trained("st3").state_dict().items()}
    fresh = sparsify.sparsify(net(), "st3", total_steps=8, example_inputs=torch.zeros(1, 3, 8, 8))
    with pytest.raises(RuntimeError) as err:
        fresh.load_state_dict(state)
    assert f"the checkpoint's keys start with {prefix!r}" in str(err.value)
    assert "holds no sparsify state" not in str(err.value)
    with pytest.warns(UserWarning, match=f"keys start with {prefix!r} .* nothing of it was loaded: strip it"):
        fresh.load_state_dict(state, strict=False)
    assert int(sparsify.core.state.find_state(fresh).step) == 0


def test_a_load_starts_a_new_evaluation_of_the_regularized_activations():
    """The report's activation figure averaged the evaluations before and after a load_state_dict
    (a model left in eval mode): it belongs to the weights the load replaced."""
    m = trained("tl1", steps=2)
    ck = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    m.eval()
    with torch.no_grad():
        m(x * 5 - 2)
        m.load_state_dict(ck)
        m(x)
    fresh = sparsify.sparsify(net(), "tl1", total_steps=8, example_inputs=torch.zeros(1, 3, 8, 8))
    fresh.load_state_dict(ck)
    fresh.eval()
    with torch.no_grad():
        fresh(x)
    assert sparsify.report(m).totals["achieved"] == sparsify.report(fresh).totals["achieved"]


def test_a_bare_checkpoint_loaded_into_a_wrapper_says_the_prefix_it_lacks():
    """The converse of a wrapper's checkpoint: the model's own state_dict loaded into a module that
    holds it under a name is not called a checkpoint saved before sparsify()."""
    state = trained("st3").state_dict()
    wrapper = nn.Module()
    wrapper.inner = sparsify.sparsify(net(), "st3", total_steps=8, example_inputs=torch.zeros(1, 3, 8, 8))
    with pytest.raises(RuntimeError) as err:
        wrapper.load_state_dict(state)
    assert "the checkpoint's keys lack the prefix 'inner.'" in str(err.value)
    assert "holds no sparsify state" not in str(err.value)
