"""``example_inputs`` as keyword arguments, the way transformers models are called: a dict or a
tokenizer's ``BatchEncoding`` goes to ``sparsify``, ``plan``, ``finalize`` and the export helpers
(docs/index.md). Before, the dict was passed as the model's first positional argument and
``sparsify`` refused it ("shapes dict raise TypeError")."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from passes.call_inputs import positional_inputs

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

IDS = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS).index_fill_(1, torch.tensor([10, 11]), 0)


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  vocab_size=100, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


SOON = {"st3": {"begin": 0, "end": 2}}  # pruned within the two steps


@pytest.mark.parametrize("recipe", ["st3", "tl1", "nm-2-4"])
def test_a_batch_encoding_is_the_example_call(recipe):
    enc = transformers.BatchEncoding({"input_ids": IDS, "attention_mask": MASK})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(bert(), recipe, total_steps=2, example_inputs=enc, **SOON.get(recipe, {}))
    opt = torch.optim.AdamW(sparsify.param_groups(model), lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(2):
        out = model(**enc, labels=labels)
        (out.loss + sparsify.penalty(model)).backward()
        opt.step()
        opt.zero_grad()
        sparsify.step(model)
    assert model.sparsify_state.example_inputs[1] is not None  # the mask is the second argument
    final = sparsify.finalize(model)  # checked on the kept call, attention mask included
    with torch.no_grad():
        torch.testing.assert_close(final(**enc).logits, model.eval()(**enc).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        positional = sparsify.sparsify(bert(), recipe, total_steps=2, example_inputs=(IDS, MASK), **SOON.get(recipe, {}))
    macs = [row.macs for row in sparsify.report(model).layers]  # counted on the kept call
    assert macs == [row.macs for row in sparsify.report(positional).layers]
    assert recipe == "tl1" or all(macs)  # activation rows count no MACs of their own


def test_keyword_inputs_to_plan_and_finalize():
    enc = {"input_ids": IDS, "labels": IDS}  # a causal LM called with labels returns its loss
    p = sparsify.plan(llama(), "gmp", total_steps=4, example_inputs=enc)
    assert len(p.rewritten) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparsify.sparsify(llama(), "gmp", total_steps=4)
        final = sparsify.finalize(model, {"input_ids": IDS, "attention_mask": MASK})
    assert isinstance(final, transformers.LlamaForCausalLM)


def test_keyword_inputs_fill_the_parameters_between_at_their_defaults():
    args = positional_inputs(llama(), {"input_ids": IDS, "labels": IDS})
    assert args[0] is IDS and args[-1] is IDS and all(a is None for a in args[1:-1])


def test_an_unknown_keyword_is_one_line():
    with pytest.raises(ValueError, match=r"^example_inputs: BertForSequenceClassification.forward has no parameter "
                                         r"'pixel_values' \(it takes input_ids, attention_mask"):
        sparsify.sparsify(bert(), "st3", total_steps=4, example_inputs={"input_ids": IDS, "pixel_values": IDS})


def test_a_dict_naming_no_parameter_is_the_one_argument():
    """A forward that takes a dict (sentence-transformers' ``forward(features)``) gets it as before."""
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, features):
            return {**features, "embedding": self.proj(features["tokens"]).mean(1)}

    feats = {"tokens": torch.randn(2, 5, 8)}
    model = sparsify.sparsify(Features(), "st3", total_steps=4, example_inputs=feats)
    assert model.sparsify_state.example_inputs[0] is feats  # the first positional argument
    assert sparsify.finalize(model)(feats)["embedding"].shape == (2, 4)


def test_a_keyword_only_parameter_is_named_as_such():
    class KeywordOnly(nn.Module):
        def forward(self, x, *, scale=None):
            return x

    with pytest.raises(ValueError, match="^example_inputs: KeywordOnly.forward takes 'scale' by keyword only"):
        positional_inputs(KeywordOnly(), {"x": torch.zeros(1), "scale": 2.0})


def test_a_key_only_kwargs_would_take_says_why_it_does_not():
    """forward(x, **kwargs) given {"x", "scale"}: the refusal says why **kwargs does not take
    'scale' (the calls made with example inputs are positional) and the fix; sparsify says the same."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)

        def forward(self, x, **kwargs):
            h = self.a(x)
            return h * kwargs["scale"] if "scale" in kwargs else h

    inputs = {"x": torch.zeros(3, 8), "scale": torch.tensor(2.0)}
    message = (r"^example_inputs: Scaled.forward has no parameter 'scale' \(it takes x\), and its \*\*kwargs cannot "
               "get it from example inputs, which are bound to positional parameters: give forward a parameter for it "
               "or leave it out$")
    with pytest.raises(ValueError, match=message):
        positional_inputs(Scaled(), inputs)
    with pytest.raises(ValueError, match=message):
        sparsify.sparsify(Scaled(), "gmp", total_steps=10, example_inputs=inputs)


def test_a_required_parameter_left_out_is_one_line():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ValueError, match="^example_inputs: Two.forward needs 'x', which they leave out$"):
        positional_inputs(Two(), {"y": torch.zeros(1)})


def test_export_helpers_take_keyword_inputs():
    from sparsify.deploy.export import export_program

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, scale=None):
            return self.fc(x) if scale is None else self.fc(x) * scale

    net = Net()
    x, s = torch.randn(3, 4), torch.full((1,), 2.0)
    ep = export_program(net, {"x": x, "scale": s})
    torch.testing.assert_close(ep.module()(x, s), net(x, s))


def convnext():
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)
    return transformers.ConvNextForImageClassification(cfg)


PIXELS = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 3, 5, 9])
SKIPS = "its own forward runs"


def _exported(example):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sparsify.sparsify(convnext(), "tl1", example_inputs=example, capture="export")
    return model.train(), [str(w.message) for w in caught]


def _penalty_and_warnings(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(*args, **kwargs)
    penalty = float(torch.as_tensor(sparsify.penalty(model)).detach())
    return penalty, [str(w.message) for w in caught if SKIPS in str(w.message)]


@pytest.mark.parametrize("with_labels", [False, True])
def test_an_exported_transformers_model_runs_its_graph_for_the_examples_own_call(with_labels):
    """ConvNext's forward(pixel_values=None, labels=None, **kwargs) exported on keyword example
    inputs: the example's own call, by keyword as given and by position, runs the graph (tl1's
    penalty > 0, no warning). Before, its **kwargs made every keyword call, and with labels every
    call, run the model's own forward: penalty 0 and a warning to pass the example it was given."""
    example = {"pixel_values": PIXELS, "labels": LABELS} if with_labels else {"pixel_values": PIXELS}
    model, _ = _exported(example)
    for args, kwargs in (((), example), (tuple(example.values()), {})):
        penalty, skipped = _penalty_and_warnings(model, *args, **kwargs)
        assert penalty > 0 and not skipped, (args, list(kwargs), penalty, skipped)


def test_an_exported_transformers_model_says_which_calls_it_cannot_serve_and_why():
    """Calls with other arguments than the example's run the model's own forward: the warning names
    the argument and a fix that works (not "pass example_inputs that call it this way", which the
    call already did), and sparsify() said at once which calls the graph serves."""
    model, built = _exported({"pixel_values": PIXELS})
    said = [m for m in built if 'capture="export": the graph of ConvNextForImageClassification serves' in m]
    assert len(said) == 1 and "also passes labels" in said[0] and "**kwargs" in said[0], built
    assert any(n in said[0] for n in model.sparsify_state.plan.capture_notes)
    penalty, skipped = _penalty_and_warnings(model, pixel_values=PIXELS, labels=LABELS)
    assert penalty == 0 and len(skipped) == 1, skipped
    assert "it passes labels, which example_inputs left out" in skipped[0] and 'capture="fx"' in skipped[0]
    _, skipped = _penalty_and_warnings(model, PIXELS, output_hidden_states=True)
    assert "it passes output_hidden_states to **kwargs" in skipped[0], skipped
    labelled, _ = _exported({"pixel_values": PIXELS, "labels": LABELS})
    _, skipped = _penalty_and_warnings(labelled, PIXELS)
    assert "it leaves out labels, which example_inputs passed" in skipped[0], skipped
