"""Guards for sparsify.prepare behaviours a user relies on that no other test pinned: shared and
tied weights, labelled forwards, the transformer fast path, attention checkpoints, the global MHA
fast-path switch, the plan's listing of bare weights, and which models are taken or refused."""
from __future__ import annotations

import weakref
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import sparsify
from warned import warned

SHARED = "were trained through a model sparsify() returned earlier"


class SharedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.stem(x)))))


def test_semi_structured_masks_both_convs_sharing_one_weight():
    """Semi-structured keeps tied weights: both convs sharing a weight get their own 2:4 mask."""
    x = torch.randn(2, 3, 8, 8)
    m = sparsify.sparsify(SharedConvs(), "semi-structured", total_steps=10, example_inputs=x)
    methods = {e.name: e.method for e in m.sparsify_state.plan.entries}
    assert methods.get("b") == "semi-structured", methods
    assert hasattr(m, "b_pmask") and hasattr(m, "a_pmask")


def _base():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(m):
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    sparsify.step(m)


def test_fresh_models_are_not_taken_for_earlier_trained_ones(monkeypatch):
    """A new model whose parameter reuses the id of a dead trained one is not warned about sharing."""
    from sparsify.prepare import sharing
    fresh = _base()
    p = next(fresh.parameters())
    dead = weakref.ref(nn.Parameter(torch.zeros(1)))  # a trained parameter since freed, its id now p's
    assert dead() is None
    monkeypatch.setitem(sharing._HOLDERS, id(p), [dead, True])
    _, said = warned(lambda: sparsify.sparsify(fresh, "gmp", total_steps=2))
    assert not any(SHARED in w for w in said), said


def test_every_later_sparsify_of_a_trained_base_warns():
    """Sparsifying a base again after training through it warns each time, not only the first."""
    net = _base()
    _train(sparsify.sparsify(net, "gmp", total_steps=2, begin=0, end=1))
    for _ in range(2):
        _, said = warned(lambda: sparsify.sparsify(net, "st3", total_steps=2))
        assert any(SHARED in w for w in said), said


class TinyLM(nn.Module):
    def __init__(self, vocab=16, dim=8):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.emb(ids))))


def test_weights_written_at_step_zero_keep_embedding_and_head_tied():
    """A recipe that prunes at step 0 leaves a tied embedding and head one tensor, before and after a step."""
    ids = torch.randint(0, 16, (2, 5))
    rec = {"version": 1, "schedule": {"begin": 0, "end": 0, "fix": 0},
           "rules": [{"match": {"type": ["Linear"]}, "method": "st3", "params": {"sparsity": 0.5}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(TinyLM(), rec, total_steps=10, example_inputs=ids)
        assert m.emb.weight is m.head.weight, "sparsify untied the embedding and the head"
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(ids).square().mean().backward()
        opt.step()
        sparsify.step(m)
    assert m.emb.weight is m.head.weight, "a training step untied the embedding and the head"


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 1).flatten(1)


def _labelled(label):
    """A transformers-like head whose label keyword is ``label`` (a named parameter, None by default)."""
    src = (f"def forward(self, pixel_values, {label}=None):\n"
           "    logits = self.head(self.backbone(pixel_values))\n"
           f"    return {{'loss': None if {label} is None else F.cross_entropy(logits, {label}), 'logits': logits}}\n")
    ns: dict = {}
    exec(src, {"F": F}, ns)

    def init(self):
        nn.Module.__init__(self)
        self.backbone, self.head = Backbone(), nn.Sequential(nn.Linear(4, 3))
    return type("Classifier", (nn.Module,), {"__init__": init, "forward": ns["forward"]})()


@pytest.mark.parametrize("label", ["label", "next_sentence_label", "mc_labels"])
def test_a_label_keyword_other_than_labels_runs_the_recipe(label):
    """forward(pixel_values, label=None): the labelled training call runs tl1's inserted nodes."""
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    m, said = warned(lambda: sparsify.sparsify(_labelled(label), "tl1", total_steps=6,
                                                example_inputs={"pixel_values": x}))
    out, more = warned(lambda: m(pixel_values=x, **{label: y}))
    assert out["loss"] is not None
    assert float(torch.as_tensor(sparsify.penalty(m)).detach()) > 0  # tl1's nodes ran
    assert not [w for w in said + more if "called with" in w], said + more


def test_encoder_eval_no_grad_matches_grad_enabled_with_sparse_feedforward():
    """An encoder whose only sparse layers are linear1/linear2 gives the same eval output with and without grad."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                enable_nested_tensor=False)
    x = torch.randn(3, 4, 16)
    rec = {"version": 1, "rules": [{"match": {"name": ["layers.*.linear1", "layers.*.linear2"]},
                                    "method": "magnitude", "params": {"sparsity": 0.9, "begin": 0, "end": 1}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(enc, rec, total_steps=4, example_inputs=x)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for _ in range(2):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sparsify.step(m)
    m.eval()
    with torch.no_grad():
        fast = m(x)
    torch.testing.assert_close(fast, m(x).detach(), rtol=1e-5, atol=1e-5)


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


def test_a_dense_attention_state_dict_loads_into_the_converted_attention():
    """Loading nn.MultiheadAttention's own state_dict into the sparsified attention leaves no key over."""
    x = torch.randn(2, 5, 8)
    dense = AttnNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(AttnNet(), "gmp", total_steps=10, example_inputs=x)
    res = m.mha.load_state_dict(dense.mha.state_dict(), strict=False)
    assert not res.unexpected_keys, res  # the masks are the converted attention's own: missing is expected


@pytest.mark.parametrize("before", [False, True])
def test_the_users_mha_fast_path_setting_is_kept(before):
    """sparsify() and plan() leave torch.backends.mha's fast-path switch as the user set it."""
    x = torch.randn(2, 5, 8)
    saved = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(before)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparsify.plan(AttnNet(), "gmp", total_steps=10, example_inputs=x)
            assert torch.backends.mha.get_fastpath_enabled() is before
            sparsify.sparsify(AttnNet(), "gmp", total_steps=10, example_inputs=x)
        assert torch.backends.mha.get_fastpath_enabled() is before
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


MAGNITUDE = {"version": 1, "rules": [{"match": {"name": "lin"}, "method": None},
                                      {"match": {"type": "Linear"}, "method": "magnitude"}]}


class ReadsLinearWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.fc = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.linear(x, self.lin.weight))


class OwnWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.fc = nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.linear(x, self.weight))


class HoldsOwnWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = OwnWeight()

    def forward(self, x):
        return self.blk(x)


def _entries(model, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, MAGNITUDE, total_steps=10, example_inputs=torch.randn(2, 8))
    return [(e.name, e.kind) for e in plan.entries if e.name in names]


def test_a_linear_weight_read_by_f_linear_is_listed_once():
    """The plan counts a Linear's weight read by F.linear once, so its shares add up."""
    assert len(_entries(ReadsLinearWeight(), ("lin", "lin.weight"))) == 1


def test_a_custom_modules_own_weight_multiplied_by_f_linear_is_listed_once():
    """A custom module's 2-D weight used in F.linear is one plan entry, not two."""
    assert len(_entries(HoldsOwnWeight(), ("blk", "blk.weight"))) == 1


def test_a_class_level_state_attribute_is_refused():
    """A model class that defines sparsify_state itself is refused before sparsify overwrites it."""
    cls = type("Odd", (nn.Sequential,), {"sparsify_state": "mine"})
    with pytest.raises(ValueError, match="sparsify keeps its state under that name"):
        sparsify.sparsify(cls(nn.Linear(4, 4)), "gmp", total_steps=10)


class Heads(nn.ModuleDict):
    def forward(self, x):
        return self["a"](x) + self["b"](x)


def test_a_module_dict_subclass_with_its_own_forward_is_sparsified():
    """A ModuleDict subclass with a forward (timm's FeatureDictNet) is traced like any model."""
    x = torch.randn(2, 4)
    m = sparsify.sparsify(Heads({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}), "gmp", total_steps=10,
                          example_inputs=x)
    assert [e.name for e in m.sparsify_state.plan.entries if e.method] == ["a", "b"]
    assert m(x).shape == (2, 4)


class WarnsWhenTraced(nn.Module):
    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):
            warnings.warn("a traced value")
        return x


class NoisyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.blk, self.b = nn.Linear(4, 4), WarnsWhenTraced(), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.blk(self.a(x)))


def test_plan_holds_tracing_warnings_back_and_sparsify_sums_them_up():
    """sparsify.plan() is a dry run that says nothing; sparsify() gives one line about tracing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = sparsify.plan(NoisyNet(), "gmp", total_steps=10)
    assert plan.trace_warnings
    _, said = warned(lambda: sparsify.sparsify(NoisyNet(), "gmp", total_steps=10))
    assert any("raised while tracing held back" in w for w in said), said


class BaseTunerLayer(nn.Module):
    """A class of the user's own that happens to share peft's name."""


class Scaled(BaseTunerLayer):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return 2 * self.lin(x)


def test_a_non_peft_class_named_base_tuner_layer_is_not_an_adapter():
    """Only peft's BaseTunerLayer marks a PEFT adapter: a namesake's layers are sparsified."""
    plan = sparsify.plan(nn.Sequential(Scaled(), nn.ReLU(), nn.Linear(4, 2)), "gmp", total_steps=10)
    assert not plan.has_adapters
    assert [e.method for e in plan.entries if e.name == "0.lin"] == ["magnitude"]


def test_the_plan_gives_a_refused_layer_the_methods_reason():
    """A layer a rule matches but whose method cannot take its type is listed with that reason, not 'no rule matched'."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    recipe = {"version": 1, "name": "semi-all",
              "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "method": "semi-structured"}]}
    entries = {e.name: e for e in sparsify.plan(net, recipe, example_inputs=torch.zeros(1, 3, 8, 8)).entries}
    assert entries["3"].method is None
    assert entries["3"].reason == "semi-structured applies to Conv2d only (rule 0)"


def test_plan_and_sparsify_leave_a_qat_models_observers_as_they_were():
    """A QAT-prepared model's observers and fake-quantizers update their statistics in every
    forward, eval included: the example forwards (positions per sample for the MACs) changed 29
    of its state_dict values and sizes (per-channel observers start empty). Now put back."""
    import torch.ao.quantization as tq
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 12 * 12, 10)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
        net = prepare_qat_fx(net, tq.get_default_qat_qconfig_mapping("x86"), (x,))
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def changed():
        now = net.state_dict()
        return [k for k, v in before.items() if now[k].shape != v.shape or not torch.equal(now[k], v)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsify.plan(net, "gmp", example_inputs=(x,), total_steps=4)
        assert changed() == []
        sparsify.sparsify(net, "gmp", example_inputs=(x,), total_steps=4)
        assert changed() == []


class _Branchy(nn.Module):
    """Branches on its input's values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) if x.sum() > 0 else -self.inner(x)


class _UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.odd = _Branchy()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.odd(self.body(x))
        return self.head(x) if x.mean() > 0 else self.head(-x)


def test_only_layers_inside_an_untraceable_module_get_that_note():
    """Every unmatched layer of a model whose root could not be traced read "no rule matched (inside an
    untraceable submodule)", also those of the children traced below it (here ``body``): the note is
    for layers that no graph holds (in ``odd``, or called by the root's own forward)."""
    recipe = {"version": 1, "rules": [{"match": {"name": "body.0"}, "method": "magnitude",
                                       "params": {"sparsity": 0.5}}]}
    plan = sparsify.plan(_UntraceableRoot(), recipe, total_steps=10, example_inputs=torch.randn(2, 4))
    reasons = {e.name: e.reason for e in plan.entries if e.method is None}
    untraceable = "no rule matched (inside an untraceable submodule)"
    assert reasons == {"body.2": "no rule matched", "odd.inner": untraceable, "head": untraceable}, reasons
