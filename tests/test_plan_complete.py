"""The plan lists every weight matrix it does not rewrite, with the reason, and counts it in the
shares; frozen weights are left dense by default (the recipe option ``frozen`` opts in), tied ones on
request (``"tied": "dense"``)."""
import warnings

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin


class Mixed(nn.Module):
    """An embedding tied to the head, a transposed conv (rewritten), a GRU, a bare parameter used through
    F.linear, a frozen Linear, attention with separate q/k/v weights (rewritten), one plain Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.up = nn.ConvTranspose1d(8, 8, 3)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.up(h.transpose(1, 2))[..., : ids.shape[1]].transpose(1, 2)
        h, _ = self.rnn(h)
        h = F.linear(h, self.w)
        h = self.frozen(self.fc(h))
        return self.head(h)


def _plan(recipe="st3"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.plan(Mixed(), recipe, example_inputs=torch.randint(0, 10, (2, 5)))


def test_every_weight_matrix_is_listed_and_counted():
    plan = _plan()
    kinds = {e.name: e for e in plan.entries}
    # the head tied to the embedding is rewritten (one mask for both uses: test_tied_weights.py)
    assert sorted(e.name for e in plan.rewritten) == ["fc", "head", "mha.k_proj", "mha.out_proj", "mha.q_proj",
                                                      "mha.v_proj", "up"]
    for name, words in {"rnn": "GRU weights", "w": "bare parameter", "frozen": "frozen"}.items():
        assert words in kinds[name].reason, (name, kinds[name].reason)
    rnn = Mixed().rnn
    assert kinds["rnn"].params == sum(p.numel() for n, p in rnn.named_parameters() if n.startswith("weight"))
    total = sum(e.params for e in plan.entries)
    # head (tied: counted once), up, fc, the attention's q (8x8), k and v (8x4 each) and out (8x8)
    assert plan.shares()["param_share"] == pytest.approx((64 + 8 * 8 * 3 + 80 + 64 + 32 + 32 + 64) / total)
    assert "weight parameters" in str(plan)


def test_tied_weights_left_dense_on_request():
    torch.manual_seed(0)
    model = Mixed()
    recipe = dict(sparsify.load_recipe("gmp").data, options={"tied": "dense"})
    with pytest.warns(UserWarning, match="head stays dense: weight tied to emb.weight"):
        m = sparsify.sparsify(model, recipe, total_steps=4, example_inputs=torch.randint(0, 10, (2, 5)))
    assert not isinstance(m.head, SparseWeightMixin) and m.head.weight is m.emb.weight
    plan = sparsify.plan(Mixed(), recipe, example_inputs=torch.randint(0, 10, (2, 5)))
    assert "tied to emb.weight" in next(e for e in plan.entries if e.name == "head").reason


@pytest.mark.parametrize("recipe", ["st3", "dual", "str"])
def test_frozen_layers_are_left_alone_unless_included(recipe):
    torch.manual_seed(0)
    model = Mixed()
    before = model.frozen.weight.detach().clone()
    x = torch.randint(0, 10, (2, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(model, recipe, total_steps=4, example_inputs=x)
        # said, with the share: the headline sparsity counts the rewritten layers only
        said = [str(w.message) for w in caught if "frozen layer(s)" in str(w.message)]
        assert len(said) == 1 and "1 frozen layer(s) (requires_grad=False) that the recipe matched stay dense" \
            in said[0] and "(first: frozen)" in said[0], said
        opt = torch.optim.SGD(sparsify.param_groups(m, 1e-3), lr=0.1)
        for _ in range(4):
            loss = m(x).pow(2).mean() + sparsify.penalty(m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(m)
    assert not isinstance(m.frozen, SparseWeightMixin)
    assert not any(p.requires_grad for p in m.frozen.parameters())  # no trainable threshold either
    assert torch.equal(m.frozen.weight, before)
    data = {"version": 1, "name": "inc", "options": {"frozen": "include"},
            "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        included = sparsify.plan(Mixed(), data, example_inputs=x)
        # finalize keeps each parameter as trainable as it was, a frozen layer rewritten or not
        for sparse in (m, sparsify.sparsify(Mixed(), data, example_inputs=x)):
            final = sparsify.finalize(sparse)
            assert not any(p.requires_grad for p in final.frozen.parameters())
            assert all(p.requires_grad for n, p in final.named_parameters() if not n.startswith("frozen."))
    assert "frozen" in {e.name for e in included.rewritten}


def test_a_layer_left_dense_as_frozen_and_unfrozen_later_is_said_once():
    """Frozen warm-up, then unfreeze (a common fine-tuning pattern): the layers sparsify() left
    dense because they were frozen train dense from then on; sparsify.step says so, once, at the
    first step they are trainable, and not before."""
    torch.manual_seed(0)
    x = torch.randint(0, 10, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frozen layer's warning at sparsify(): tested above
        m = sparsify.sparsify(Mixed(), "st3", total_steps=6, example_inputs=x)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    said = []
    for t in range(4):
        if t == 2:
            m.frozen.requires_grad_(True)
        loss = m(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sparsify.step(m)
        said.append([str(w.message) for w in caught if "because they were frozen" in str(w.message)])
    assert said[:2] == [[], []] and said[3] == []
    assert len(said[2]) == 1 and "1 layer(s) left dense at sparsify() because they were frozen are trainable now " \
        "(first: frozen)" in said[2][0]


class OtherLinear(nn.Module):
    """A layer class of another library (PyTorch Geometric's ``Linear``): ``F.linear`` in its forward."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight)


class GraphNet(nn.Module):
    """``int(batch.max())`` in the root's forward: untraceable, rewritten module by module."""

    def __init__(self):
        super().__init__()
        self.lin0, self.conv, self.lin2 = nn.Linear(8, 16), OtherLinear(16, 16), nn.Linear(16, 3)

    def forward(self, x, batch):
        h = F.relu(self.conv(F.relu(self.lin0(x))))
        pooled = torch.zeros(int(batch.max()) + 1, 16).index_add(0, batch, h)
        return self.lin2(pooled)


@pytest.mark.parametrize("traced", [False, True])
def test_weights_of_other_layer_classes_are_listed_once(traced):
    """The plan said the rewritten layers held 100% of the weights, and report 0.9 weight
    sparsity, while a PyG-style layer holding most of them stayed dense and unlisted."""
    x, batch = torch.randn(6, 8), torch.tensor([0, 0, 0, 1, 1, 1])
    model = GraphNet() if not traced else nn.Sequential(nn.Linear(8, 16), OtherLinear(16, 16), nn.Linear(16, 3))
    inputs = (x, batch) if not traced else (x,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(model, "st3", example_inputs=inputs)
    other = [e for e in plan.dense if "OtherLinear" in e.reason or e.name in ("conv", "conv.weight", "1.weight")]
    assert len(other) == 1 and other[0].params == 256, [(e.name, e.reason) for e in plan.entries]
    assert plan.shares()["param_share"] == pytest.approx((128 + 48) / (128 + 48 + 256))
    assert plan.kernel_weights() == other  # outside the MAC counts, which the report says


def test_a_later_rule_whose_method_declines_what_an_earlier_one_takes_is_said():
    """magnitude on every layer, then N:M on the depthwise convs (which N:M declines: one input
    channel per group): 11 depthwise convs of mobilenet_v3_small stayed dense, silently (later
    rules win). A later rule of the same method declining what the earlier one declines too (the
    sas recipes' downsample rule on a classifier) is not said."""
    recipe = {"version": 1, "name": "mix", "rules": [
        {"match": {"type": ["Conv2d", "Linear"]}, "method": "magnitude"},
        {"match": {"depthwise": True}, "method": "nm"}]}
    x = torch.zeros(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(torchvision.models.mobilenet_v3_small(num_classes=10), recipe, total_steps=10,
                          example_inputs=x)
        said = [str(w.message) for w in caught if "declines" in str(w.message)]
        assert len(said) == 1 and said[0].startswith(
            "sparsify: rule 1 (nm) of recipe 'mix' declines 11 layer(s) that rule 0 (magnitude) would rewrite"), said
        caught.clear()
        sparsify.sparsify(torchvision.models.mobilenet_v3_small(num_classes=10), "sas", total_steps=10,
                          example_inputs=x)
        assert not [w for w in caught if "declines" in str(w.message)]


def test_weights_a_fused_kernel_reads_are_warned_when_they_weigh():
    """An LSTM (41% of timm's sequencer2d) stayed dense with no word at sparsify(), unlike fused
    experts and frozen layers (attention with separate q/k/v projections is rewritten now)."""
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lstm = nn.Linear(8, 32), nn.LSTM(32, 32, batch_first=True)
            self.mha = nn.MultiheadAttention(32, 2, kdim=8, vdim=8, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            h, _ = self.lstm(self.fc(x))
            return self.head(self.mha(h, x, x)[0].mean(1))

    with pytest.warns(UserWarning, match=r"1 module\(s\) whose weights a fused kernel reads stay dense, 74% of the "
                                         r"model's weight parameters \(first: lstm, LSTM\)"):
        sparsify.sparsify(Seq(), "st3", example_inputs=(torch.randn(2, 5, 8),), total_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a small GRU beside big layers is not worth a line
        sparsify.sparsify(nn.Sequential(nn.Linear(64, 64), nn.GRU(64, 1)), "st3", total_steps=4)


def test_layers_a_method_declines_are_warned_when_they_weigh():
    """N:M left a Linear(30, 2048) dense (30 inputs is no multiple of 4), 32% of the weights, and
    only the plan said it."""
    net = nn.Sequential(nn.Linear(30, 2048), nn.ReLU(), nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) the recipe matched stay dense, declined by their method, 32% "
                                         r"of the model's weight parameters \(first: 0: N:M groups"):
        sparsify.sparsify(net, "nm-2-4", total_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an RGB stem is a small share: not worth a line
        sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "nm-2-4", total_steps=4)


def test_a_small_frozen_share_is_not_said_as_zero():
    """A frozen stem of ResNet-18 (9,408 of 11.2 M weights) read "0% of the model's weight parameters"."""
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1.weight.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify.sparsify(net, "st3", total_steps=10, example_inputs=torch.zeros(1, 3, 32, 32))
    said = [str(w.message) for w in caught if "frozen layer(s)" in str(w.message)]
    assert len(said) == 1 and "stay dense, 0.084% of the model's weight parameters" in said[0], said


class _EinsumHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.w = nn.Linear(8, 8), nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return torch.einsum("bi,ij->bj", self.lin(x), self.w)


def test_the_plans_footer_names_weights_without_macs_and_why():
    """With example_inputs the footer advised passing example_inputs that run the layers; the
    weight without MACs is a bare parameter an einsum multiplies: it says that, by name."""
    plan = sparsify.plan(_EinsumHead(), "gmp", example_inputs=(torch.randn(2, 8),), total_steps=4)
    footer = next(line for line in str(plan).splitlines() if "sites rewritten" in line)
    assert "MACs unknown for w: bare parameters multiplied by einsum in the forward" in footer, footer
    assert "pass example_inputs" not in footer


def test_a_recipe_that_rewrote_nothing_cites_the_reason_no_other_line_gives():
    """N:M declines ``0`` (3 inputs make no groups of 4); ``2`` and ``4`` are frozen, which a line of
    its own says. The "rewrote nothing" warning cites N:M's reason, though frozen is the commoner."""
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model[2].requires_grad_(False)
    model[4].requires_grad_(False)
    rules = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "nm"}]}
    plan = sparsify.plan(model, rules, example_inputs=torch.zeros(1, 3))
    said = [w for w in plan.warnings(sparsify.load_recipe(rules)) if "rewrote nothing" in w]
    assert len(said) == 1 and "3 matched site(s) stay dense (first: 0: N:M groups run along the input" in said[0], said


def test_a_layer_with_a_computed_weight_is_said_once():
    """A weight_norm'd Linear (its weight computed from two parameters) has a warning line of its
    own; it is not counted again among the layers a method declined."""
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(64, 64)))
    rules = {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": "st3"}]}
    plan = sparsify.plan(model, rules, example_inputs=torch.zeros(1, 8))
    said = plan.warnings(sparsify.load_recipe(rules))
    assert len([w for w in said if "their weight is computed" in w]) == 1, said
    assert not [w for w in said if "declined by their method" in w or "rewrote nothing" in w], said


class _FunctionalStem(nn.Module):
    """A conv stem computed by ``F.conv2d`` on parameters the model holds, then a Conv2d and a head."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2), nn.Parameter(torch.zeros(8))
        self.conv, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w, self.b, padding=1))
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("recipe, rewritten", [("gmp", 576 + 32), ("sas", 32)])
def test_a_functional_conv_lists_its_weight_not_its_bias_and_names_the_conv(recipe, rewritten):
    """The bias was listed as a 'bare parameter multiplied by conv2d' and counted as a weight
    layer left dense; the advice said nn.Linear and the footer 'einsum / matmul'."""
    plan = sparsify.plan(_FunctionalStem(), recipe, total_steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    bare = [e for e in plan.entries if e.kind == "Parameter"]
    assert [(e.name, e.params) for e in bare] == [("w", 216)]
    assert bare[0].reason.endswith("(wrap it in an nn.Conv2d to sparsify it)"), bare[0].reason
    assert plan.shares()["param_share"] == pytest.approx(rewritten / (576 + 32 + 216))
    footer = next(line for line in str(plan).splitlines() if "sites rewritten" in line)
    assert f"{len(plan.dense)} weight layers left dense" in footer and len(plan.dense) == (1 if recipe == "gmp" else 2)
    assert "MACs unknown for w: bare parameters multiplied by conv2d in the forward are not counted" in footer, footer


def test_a_bias_added_after_a_matmul_is_not_listed():
    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w)

    plan = sparsify.plan(Affine(), "gmp", total_steps=4, example_inputs=torch.randn(2, 8))
    assert [(e.name, e.reason.endswith("(wrap it in an nn.Linear to sparsify it)")) for e in plan.entries] == [("w", True)]
