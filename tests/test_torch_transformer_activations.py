"""The activation inside torch's own transformer layers, under recipes that insert nodes.

``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (and the encoders, decoders and
``nn.Transformer`` holding them) are ``torch.nn`` modules, which torch.fx keeps whole: tl1, the
activation regularizers and dual said "rule 0 matched nothing" there, whether the activation was
``F.relu``, ``"gelu"`` or a module, and SAS could not reach ``linear2`` (fed by the ReLU). Under
such recipes they are now traced on their regular path (sparsify/prepare/open_transformer.py), and
``finalize`` gives them torch's classes back."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify

E, N, S, T = 16, 3, 6, 5
G = torch.Generator().manual_seed(0)
SRC, TGT = torch.randn(N, S, E, generator=G), torch.randn(N, T, E, generator=G)
CAUSAL = nn.Transformer.generate_square_subsequent_mask(T)
PAD = torch.zeros(N, S, dtype=torch.bool)
PAD[0, -2:] = True


class Classifier(nn.Module):
    """A model built the way torch's tutorials build one: an encoder inside, a padding mask."""

    def __init__(self, activation="relu", norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True, activation=activation,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 4)

    def forward(self, x, src_key_padding_mask=None):
        return self.head(self.encoder(x, src_key_padding_mask=src_key_padding_mask).mean(1))


def models():
    return {
        "encoder-relu": (lambda: Classifier(), (SRC, PAD), "relu"),
        "encoder-gelu-module": (lambda: Classifier(nn.GELU(), norm_first=True), (SRC, PAD), "encoder.layers.0.activation"),
        "transformer": (lambda: nn.Transformer(E, 2, 1, 1, 32, dropout=0.0, batch_first=True, activation="gelu"),
                        (SRC, TGT, None, CAUSAL), "gelu"),
        "decoder": (lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(E, 2, 32, dropout=0.0, batch_first=True), 2),
                    (TGT, SRC), "relu"),
    }


def quiet_sparsify(model, recipe, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedules at step 0, dead rows of the tiny head
        return sparsify.sparsify(model, recipe, total_steps=4, example_inputs=args, **kw)


def train(m, args, steps=4):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    penalties = []
    for _ in range(steps):
        out = m(*args)
        penalty = sparsify.penalty(m)
        penalties.append(float(penalty))
        (out.square().mean() + penalty).backward()
        opt.step()
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparsify.step(m)
    return penalties


@pytest.mark.parametrize("recipe", ["tl1", "activation-l1", "activation-hoyer"])
@pytest.mark.parametrize("case", sorted(models()))
def test_regularizers_reach_the_activation_of_torch_transformer_layers(case, recipe):
    make, args, first_site = models()[case]
    torch.manual_seed(0)
    dense = make()
    plan = sparsify.plan(dense, recipe, example_inputs=args)
    sites = [e.name for e in plan.entries if e.method]
    assert sites and sites[0] == first_site and not plan.unmatched_rules
    assert any("regular path" in note for note in plan.capture_notes)
    m = quiet_sparsify(dense, recipe, args)
    dense.eval()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(*args), dense(*args), rtol=1e-5, atol=1e-6)  # same function before training
    m.train()
    assert min(train(m, args)) > 0  # the penalty sees the activations
    m.eval()
    with torch.no_grad():
        trained = m(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsify.FinalizeWarning)
        final = sparsify.finalize(m, example_inputs=args)
    opened = [type(mod).__name__ for mod in final.modules() if type(mod).__module__.startswith("sparsify")]
    assert not opened, opened  # torch's classes, fused inference paths and all, again
    with torch.no_grad():
        torch.testing.assert_close(final(*args), trained, rtol=1e-4, atol=1e-5)


def test_dual_prunes_the_feed_forward_and_regularizes_its_activation():
    torch.manual_seed(0)
    m = quiet_sparsify(Classifier(), "dual", (SRC, PAD))
    train(m, (SRC, PAD))
    rows = {row.name: row for row in sparsify.report(m).layers}
    assert {"encoder.layers.0.linear1", "encoder.layers.1.linear2", "relu_tl1", "relu_1_tl1"} <= set(rows)
    final = sparsify.finalize(m, example_inputs=(SRC, PAD))
    assert type(final.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert float((final.encoder.layers[0].linear1.weight == 0).float().mean()) > 0.5


def test_sas_rewrites_the_feed_forward_output_layer_after_the_relu():
    torch.manual_seed(0)
    dense = Classifier()
    m = quiet_sparsify(dense, "sas", (SRC, PAD))
    rows = [row.name for row in sparsify.report(m).layers]
    assert rows == ["encoder.layers.0.linear2", "encoder.layers.1.linear2"]
    dense.eval()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(SRC, PAD), dense(SRC, PAD), rtol=1e-5, atol=1e-6)  # SAS starts equal
    train(m, (SRC, PAD))
    final = sparsify.finalize(m, example_inputs=(SRC, PAD))
    with torch.no_grad():
        torch.testing.assert_close(final(SRC, PAD), m.eval()(SRC, PAD), rtol=1e-4, atol=1e-5)


def test_weight_recipes_leave_the_layers_torch_classes():
    # module-for-module rewriting reaches linear1 / linear2 without a trace (fast_path.py): no class changes
    m = quiet_sparsify(Classifier(), "st3", (SRC, PAD))
    assert type(m.encoder.layers[0]) is nn.TransformerEncoderLayer


def test_a_recipe_reaching_nothing_inside_gives_the_classes_back():
    # semi-structured matches Conv2d only: the layers keep torch's class (and its fused inference path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matched nothing
        m = sparsify.sparsify(Classifier(), "semi-structured", total_steps=4, example_inputs=(SRC, PAD))
    assert {type(mod).__module__.split(".")[0] for mod in m.modules() if "Transformer" in type(mod).__name__} == {"torch"}


def test_state_dict_round_trip_and_a_failed_inplace_rewrite(monkeypatch):
    torch.manual_seed(0)
    m = quiet_sparsify(Classifier(), "tl1", (SRC, PAD))
    train(m, (SRC, PAD), steps=2)
    fresh = quiet_sparsify(Classifier(), "tl1", (SRC, PAD))
    fresh.load_state_dict(m.state_dict())
    m.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(SRC, PAD), m(SRC, PAD), rtol=0, atol=0)
    model = Classifier()

    def fail(*args, **kwargs):
        raise RuntimeError("a method failing halfway")
    monkeypatch.setattr("sparsify.prepare.build.hidden_candidates", fail)  # after the capture opened the layers
    with pytest.raises(RuntimeError, match="halfway"):
        sparsify.sparsify(model, "tl1", total_steps=4, example_inputs=(SRC, PAD), inplace=True)
    assert type(model.encoder) is nn.TransformerEncoder and type(model.encoder.layers[0]) is nn.TransformerEncoderLayer
