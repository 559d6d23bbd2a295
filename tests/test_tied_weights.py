"""Tied weights (an embedding registered with the LM head's parameter): one mask for both uses by
default (``options.tied = "share"``), kept tied through training, state_dict and finalize; left
dense (``"dense"``) or refused (``"error"``, or where sharing is impossible) with one clear line."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.tied import TiedEmbedding, TiedUse

RECIPES = ["st3", "st3-sigma", "gmp", "str", "str-global", "nm-2-4", "dual"]


class TinyLM(nn.Module):
    """An embedding tied to the LM head (tie_word_embeddings), one hidden Linear."""

    def __init__(self, vocab=16, dim=8, max_norm=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, max_norm=max_norm)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.emb(ids))))


IDS = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))


def _train(m, args, steps=3, loss_fn=lambda out: out.square().mean()):
    opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = loss_fn(m(*args)) + sparsify.penalty(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)


def _recipe(name, tied):
    data = copy.deepcopy(sparsify.load_recipe(name).data)
    data.setdefault("options", {})["tied"] = tied
    return data


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_mask_for_both_uses(recipe):
    torch.manual_seed(0)
    model = TinyLM()
    keys = sorted(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sharing is the default: no "stays dense" warning
        warnings.filterwarnings("ignore", message=".*jsonschema is not installed")  # a GPU image's, not ours
        m = sparsify.sparsify(model, recipe, example_inputs=IDS, total_steps=3)
    assert isinstance(m.head, SparseWeightMixin) and isinstance(m.emb, TiedEmbedding)
    assert m.emb.weight is m.head.weight  # the parameter stays shared (one latent weight)
    assert model.emb.weight is model.head.weight and type(model.emb) is nn.Embedding  # caller's model untouched
    _train(m, (IDS,))
    eff = m.head.effective_weight().detach()
    assert torch.equal(m.emb(IDS).detach(), eff[IDS])  # the lookup reads the head's effective weight
    rep = sparsify.report(m)
    if recipe not in ("str", "str-global"):  # STR needs many decayed steps to prune
        assert rep.totals["weight_sparsity"] > 0.3
    # the shared matrix counted once, with its effective weight's non-zeros
    own = {id(p) for n, p in m.named_parameters() if n.endswith(".s")}  # STR's thresholds: not the model's
    assert rep.totals["params"] == sum(p.numel() for p in m.parameters() if id(p) not in own)
    latent = {id(m.head.weight), id(m.fc.weight)}
    nnz = sum(int(p.count_nonzero()) for p in m.parameters() if id(p) not in latent | own)
    nnz += int(eff.count_nonzero()) + int(m.fc.deployed_weight().count_nonzero())
    assert rep.totals["nonzero_params"] == nnz
    assert sorted(m.state_dict()) == sorted(keys + [k for k in m.state_dict() if k not in keys])
    m.eval()
    out = m(IDS)
    final = sparsify.finalize(m)  # checks its outputs against m's
    assert type(final.emb) is nn.Embedding and type(final.head) is nn.Linear
    assert final.emb.weight is final.head.weight and torch.equal(final.head.weight, eff)
    torch.testing.assert_close(final(IDS), out)
    fresh = sparsify.sparsify(TinyLM(), recipe, example_inputs=IDS, total_steps=3)
    fresh.load_state_dict(m.state_dict())
    assert fresh.emb.weight is fresh.head.weight
    torch.testing.assert_close(fresh.eval()(IDS), out, rtol=0, atol=0)


def test_two_layers_sharing_a_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    x = torch.randn(3, 6)
    m = sparsify.sparsify(model, "gmp", example_inputs=x, total_steps=3)
    assert isinstance(m[2], TiedUse) and m[2].tied_to == "0" and m[2].weight is m[0].weight
    plan = sparsify.core.state.find_state(m).plan
    entry = next(e for e in plan.entries if e.name == "2")
    assert entry.method is None and "tied to 0" in entry.reason and entry.params == 0
    _train(m, (x,))
    assert torch.equal(m[2].effective_weight(), m[0].effective_weight())
    final = sparsify.finalize(m)
    assert final[0].weight is final[2].weight and type(final[2]) is nn.Linear


def _shared_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    return model


@pytest.mark.parametrize("first, second, said", [
    ({"method": "st3"}, {"method": "magnitude"}, r"2 is matched by rule 1 \(magnitude\) and 0 by rule 0 \(st3\)"),
    ({"method": None}, {"method": "magnitude"}, r"0 is matched by rule 0 \(null: dense\) and 2 by rule 1"),
    ({"method": "magnitude", "params": {"sparsity": 0.5}}, {"method": "magnitude", "params": {"sparsity": 0.8}},
     r"2 is matched by rule 1 \(magnitude with other params\) and 0 by rule 0")])
def test_tied_layers_matched_by_disagreeing_rules_are_refused(first, second, said):
    """Two rules asking different things of one shared weight: the later-processed layer's rule
    was dropped without a word (b computed with a's 50% mask under an 80% rule), or a layer a
    null rule excluded computed with the other's 80% zeros while the plan said "excluded"."""
    recipe = {"version": 1, "rules": [{"match": {"name": "0"}, **first}, {"match": {"name": "2"}, **second}]}
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match=said + ".*the tie has one weight: match both with one rule"):
        sparsify.sparsify(_shared_pair(), recipe, example_inputs=x, total_steps=3)
    assert "sparsify refuses" in next(e.reason for e in sparsify.plan(_shared_pair(), recipe, example_inputs=x).entries
                                      if e.name == "2")


def test_tied_layers_matched_by_rules_asking_the_same_share_one_mask():
    rule = {"method": "magnitude", "params": {"sparsity": 0.5, "begin": 0, "end": 0}}
    recipe = {"version": 1, "rules": [{"match": {"name": "0"}, **rule}, {"match": {"name": "2"}, **rule}]}
    m = sparsify.sparsify(_shared_pair(), recipe, example_inputs=torch.randn(3, 6), total_steps=3)
    assert isinstance(m[2], TiedUse) and float((m[0].effective_weight() == 0).float().mean()) == 0.5


def test_dense_option_keeps_the_old_behaviour():
    with pytest.warns(UserWarning, match="head stays dense: weight tied to emb.weight"):
        m = sparsify.sparsify(TinyLM(), _recipe("st3", "dense"), example_inputs=IDS, total_steps=3)
    assert type(m.head) is nn.Linear and type(m.emb) is nn.Embedding and m.head.weight is m.emb.weight


def test_dense_option_names_share_only_where_the_method_can_share():
    """SAS changes the weight's shape: the warning advised 'share', which SAS refuses."""
    sas = {"version": 1, "name": "s", "options": {"tied": "dense"},
           "rules": [{"match": {"type": "Linear"}, "method": "sas", "params": {"not_relu": "as_is"}}]}
    with pytest.warns(UserWarning, match=r"head stays dense: weight tied to emb.weight") as caught:
        m = sparsify.sparsify(TinyLM(), sas, example_inputs=IDS, total_steps=3)
    said = next(str(w.message) for w in caught if "head stays dense" in str(w.message))
    assert "'share' cannot sparsify both uses (sas changes the weight's shape, so emb cannot share it)" in said, said
    assert type(m.head) is nn.Linear
    with pytest.warns(UserWarning, match="'share' sparsifies both uses with one mask"):
        sparsify.sparsify(TinyLM(), _recipe("st3", "dense"), example_inputs=IDS, total_steps=3)


def test_tied_option_is_checked_where_jsonschema_is_missing(no_jsonschema):
    with pytest.warns(UserWarning, match="jsonschema is not installed"), \
            pytest.raises(ValueError, match=r"^sparsify: options.tied is 'sometimes': use 'share'"):
        sparsify.sparsify(TinyLM(), _recipe("st3", "sometimes"), example_inputs=IDS, total_steps=3)


def test_error_option_and_impossible_shares_refuse_with_one_line():
    with pytest.raises(ValueError, match=r"head's weight is tied to emb.weight .*options.tied is 'error'.*"
                                         r'"options": \{"tied": "dense"\}'):
        sparsify.sparsify(TinyLM(), _recipe("st3", "error"), example_inputs=IDS, total_steps=3)
    # the plan does not raise: it lists what sparsify would refuse
    plan = sparsify.plan(TinyLM(), _recipe("st3", "error"), example_inputs=IDS)
    assert "sparsify refuses" in next(e for e in plan.entries if e.name == "head").reason
    with pytest.raises(ValueError, match="emb: an Embedding with max_norm renormalises its weight in place"):
        sparsify.sparsify(TinyLM(max_norm=1.0), "gmp", example_inputs=IDS, total_steps=3)
    sas = {"version": 1, "name": "s", "rules": [{"match": {"type": "Linear"}, "method": "sas",
                                                 "params": {"not_relu": "as_is"}}]}
    with pytest.raises(ValueError, match="sas changes the weight's shape, so emb cannot share it"):
        sparsify.sparsify(TinyLM(), sas, example_inputs=IDS, total_steps=3)
    with pytest.raises(ValueError, match=r"options\.tied"):
        sparsify.sparsify(TinyLM(), _recipe("st3", "sometimes"), example_inputs=IDS, total_steps=3)


def test_gpt2_tied_embeddings():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)  # tie_word_embeddings defaults to True
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing fallbacks, said elsewhere
        m = sparsify.sparsify(model, "st3", example_inputs=(ids,), total_steps=3)
        plan = sparsify.core.state.find_state(m).plan
    assert "lm_head" in {e.name for e in plan.rewritten}
    assert isinstance(m.transformer.wte, TiedEmbedding) and m.transformer.wte.weight is m.lm_head.weight
    m.train()
    opt = torch.optim.AdamW(sparsify.param_groups(m, 1e-4), lr=1e-3)
    for _ in range(3):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(m)
    eff = m.lm_head.effective_weight().detach()
    assert float((eff == 0).float().mean()) > 0.5
    assert torch.equal(m.transformer.wte(ids).detach(), eff[ids])
    m.eval()
    logits = m(ids).logits
    final = sparsify.finalize(m, (ids,))
    assert final.lm_head.weight is final.transformer.wte.weight
    assert type(final.transformer.wte) is nn.Embedding
    torch.testing.assert_close(final(ids).logits, logits, rtol=1e-4, atol=1e-5)


def test_one_embedding_under_several_names_stays_one_module():
    """T5 registers its shared embedding as shared, encoder.embed_tokens and decoder.embed_tokens."""
    torch.manual_seed(0)
    model = TinyLM()
    model.enc = nn.ModuleDict({"embed": model.emb})
    m = sparsify.sparsify(model, "st3", example_inputs=IDS, total_steps=3)
    assert m.enc["embed"] is m.emb and isinstance(m.emb, TiedEmbedding)
    final = sparsify.finalize(m)
    assert final.enc["embed"] is final.emb and type(final.emb) is nn.Embedding
    assert final.emb.weight is final.head.weight


@pytest.mark.parametrize("recipe", ["st3", "gmp", "nm-2-4"])
def test_gemma_scaled_embedding_tied_to_the_head(recipe, tmp_path):
    """Gemma ties its head to a ``GemmaTextScaledWordEmbedding`` (an nn.Embedding subclass whose
    forward scales the lookup): every weight recipe refused the model ("reads the weight in its
    own forward"). Its forward now runs unchanged on the head's effective weight; finalize,
    save_pretrained / from_pretrained and torch.save keep the class and the tie."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cls = transformers.GemmaForCausalLM
    torch.manual_seed(0)
    model = cls(transformers.GemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=64))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing fallbacks, said elsewhere
        m = sparsify.sparsify(model, recipe, example_inputs=(ids,), total_steps=3)
        opt = torch.optim.AdamW(sparsify.param_groups(m, 1e-4), lr=1e-2)
        for _ in range(3):
            loss = m(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m)
    emb = m.model.embed_tokens
    assert isinstance(emb, TiedUse) and emb.weight is m.lm_head.weight  # outside its forward: the parameter
    eff = m.lm_head.effective_weight().detach()
    assert float((eff == 0).float().mean()) >= 0.5
    assert torch.equal(emb(ids).detach(), F.embedding(ids, eff) * emb.embed_scale)
    m.eval()
    prompt = ids[:, :4]
    tokens = m.generate(prompt, max_new_tokens=5, do_sample=False)
    final = sparsify.finalize(m, (ids,))
    assert type(final.model.embed_tokens) is type(model.model.embed_tokens)
    assert final.lm_head.weight is final.model.embed_tokens.weight
    final.save_pretrained(tmp_path)
    assert torch.equal(cls.from_pretrained(tmp_path).generate(prompt, max_new_tokens=5, do_sample=False), tokens)
    torch.save(m, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(again(input_ids=ids).logits, m(input_ids=ids).logits)


class _SharedBlock(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(i, o, 3, padding=1), nn.Conv2d(o, o, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class _Skip(nn.Module):
    def __init__(self, down, nxt):
        super().__init__()
        self.down, self.nxt = down, nxt

    def forward(self, x):
        return self.nxt(self.down(x))


class _TwoNames(nn.Module):
    """MONAI's DynUNet: ``skip_layers`` registers the blocks a second time; forward calls only it."""

    def __init__(self):
        super().__init__()
        self.input_block, self.bottleneck = _SharedBlock(4, 8), _SharedBlock(8, 8)
        self.skip = _Skip(self.input_block, self.bottleneck)

    def forward(self, x):
        return self.skip(x)


@pytest.mark.parametrize("recipe", ["st3", "nm-2-4", "gmp"])
def test_a_block_registered_under_two_names(recipe):
    """sparsify raised ``KeyError: <class 'ST3Conv2d'>``: the second name of the rewritten layer's
    parent was taken for a tied user of it. Both names reach the one sparse layer, which trains,
    finalizes and reloads."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(_TwoNames(), recipe, example_inputs=(x,), total_steps=4)
    assert m.input_block.conv1 is m.skip.down.conv1 and type(m.skip.down.conv1) is not nn.Conv2d
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(4):
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(m)
    assert float((m.skip.nxt.conv2.effective_weight() == 0).float().mean()) > 0.4
    final = sparsify.finalize(m, (x,))
    assert torch.allclose(final(x), m.eval()(x), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = sparsify.sparsify(_TwoNames(), recipe, example_inputs=(x,), total_steps=4)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.eval()(x), m(x))


class _CpeBlock(nn.Module):
    def __init__(self, cpe):
        super().__init__()
        self.cpe, self.fc = cpe, nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.fc(self.cpe(x) + x)


class _UntracedBlock(_CpeBlock):
    """Its branch on a value is captured as a graph of its own, which calls the conv as ``cpe``."""

    def forward(self, x):
        y = self.cpe(x)
        if float(y.sum()) > 1e9:
            y = y * 2
        return self.fc(y + x)


class _SharedCpe(nn.Module):
    """timm's CoaT: one ConvPosEnc registered as ``cpe1`` and as the ``cpe`` of every block,
    alone (``shared="conv"``; ``"graphs"``: called under both names) or with the block around it
    (``shared="block"``)."""

    def __init__(self, shared):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.cpe1 = nn.Sequential(conv) if shared == "block" else conv
        block = _UntracedBlock if shared == "graphs" else _CpeBlock
        self.blocks = nn.Sequential(block(self.cpe1), block(self.cpe1))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _cpes(model, shared):
    """The conv under each of its names: cpe1, blocks.0.cpe, blocks.1.cpe."""
    mods = [model.cpe1, model.blocks[0].cpe, model.blocks[1].cpe]
    return [mod[0] if shared == "block" else mod for mod in mods]


@pytest.mark.parametrize("recipe", ["gmp", "st3", "str"])
@pytest.mark.parametrize("shared", ["conv", "block", "graphs"])
def test_one_layer_registered_under_several_names_is_sparsified_once(recipe, shared):
    """A module under several names is one layer (sparsify refused it as tied to itself): one sparse
    module, so one mask, under every name; it trains, reloads and finalizes to one plain module."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(_SharedCpe(shared), recipe, example_inputs=(x,), total_steps=4)
        fresh = sparsify.sparsify(_SharedCpe(shared), recipe, example_inputs=(x,), total_steps=4)
    first, *others = _cpes(m, shared)
    assert isinstance(first, SparseWeightMixin) and all(o is first for o in others)
    if shared == "graphs":
        entries = {e.name: e for e in sparsify.plan(_SharedCpe(shared), recipe, example_inputs=(x,)).entries}
        assert entries["blocks.1.cpe"].reason.startswith("the same module as blocks.0.cpe")
        assert entries["blocks.1.cpe"].params == 0 < entries["blocks.0.cpe"].params  # one layer: counted once
    _train(m, (x,), steps=4)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.eval()(x), m.eval()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(m, (x,))
    first, *others = _cpes(final, shared)
    assert type(first) is nn.Conv2d and all(o is first for o in others)
    torch.testing.assert_close(final(x), m(x))


def test_the_plan_says_a_shared_tie_puts_the_zeros_in_the_embedding_too():
    """Under the default "share", the head's zeros are the embedding's: the plan said nothing on the
    head's line, and a user deploying the model did not learn that the input embedding changes."""
    plan = sparsify.plan(TinyLM(), "st3", example_inputs=IDS)
    head = next(e for e in plan.entries if e.name == "head")
    assert head.method == "st3" and head.reason == "weight shared with emb: one mask, the zeros reach both"
    assert "weight shared with emb" in str(plan)


def test_a_head_left_dense_by_options_tied_is_warned_once():
    """With "tied": "dense" the head was warned twice, the second time as "declined by their method"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(TinyLM(), _recipe("st3", "dense"), total_steps=4, example_inputs=IDS)
    about_head = [str(w.message) for w in caught if "head" in str(w.message)]
    assert len(about_head) == 1 and "options.tied is 'dense'" in about_head[0], about_head
