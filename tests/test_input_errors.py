"""Wrong arguments to ``measure``, ``finalize`` and ``sparsify`` give one-line errors naming the
argument (``batches``, ``example_inputs``, ``max_batches``, ``rtol``, ...), never a raw torch error
from deep inside nor a silently wrong number (a tensor given as ``batches`` was iterated over its
rows: 8x too few MACs per sample)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparsify

X = torch.zeros(2, 3, 32, 32)
Y = torch.zeros(2, dtype=torch.long)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return _quiet(sparsify.sparsify, net, "st3", example_inputs=torch.zeros(2, 8), begin=0, end=2, fix=None)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return _quiet(sparsify.sparsify, torchvision.models.resnet18(num_classes=10), "st3", example_inputs=X,
                  begin=0, end=2, fix=None)


def _bert_config():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return transformers, transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, vocab_size=100, max_position_embeddings=64,
                                                 num_labels=3)


@pytest.fixture(scope="module")
def bert():
    transformers, cfg = _bert_config()
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (2, 12))
    return _quiet(sparsify.sparsify, transformers.BertForSequenceClassification(cfg), "st3",
                  example_inputs={"input_ids": ids}, begin=0, end=2, fix=None), ids


def _one_line(excinfo, *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, *, x):
        return self.fc(x)


class Recording(nn.Module):
    """Records the labels each call got: a Hugging Face batch's ``labels`` must reach forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.labels = []

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None):
        self.labels.append(labels)
        return self.fc(input_ids)


# --- measure: batches --------------------------------------------------------------------------

@pytest.mark.parametrize("batches, exc, parts", [
    (torch.randn(32, 8), TypeError, ["measure: batches is an iterable of batches", "got one Tensor of shape (32, 8)",
                                     "pass [x]"]),
    (None, TypeError, ["measure: batches is an iterable", "got NoneType"]),
    (5, TypeError, ["measure: batches is an iterable", "got int"]),
    ("x", TypeError, ["measure: batches is an iterable", "got str"]),
    ({"x": torch.zeros(2, 8)}, TypeError, ["measure: batches is an iterable", "got one dict (keys x)", "[batch]"]),
    ([], ValueError, ["measure: batches yielded no batch"]),
    ([torch.zeros(0, 8)], ValueError, ["measure: batches hold 0 samples", "(0, 8) float32"]),
], ids=["tensor", "none", "int", "str", "dict", "empty", "zero-samples"])
def test_measure_refuses_what_is_not_batches(mlp, batches, exc, parts):
    with pytest.raises(exc) as e:
        sparsify.measure(mlp, batches)
    _one_line(e, *parts)


def test_a_tensor_of_images_is_not_iterated_over_its_rows(resnet):
    with pytest.raises(TypeError) as e:
        sparsify.measure(resnet, X)
    _one_line(e, "batches", "got one Tensor of shape (2, 3, 32, 32)", "pass [x]")
    assert sparsify.measure(resnet, [X]).samples == 2


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_one_input_target_batch_given_as_batches_is_named(model, request):
    net = request.getfixturevalue(model)
    x = torch.zeros(2, 8) if model == "mlp" else X
    with pytest.raises(ValueError) as e:
        sparsify.measure(net, (x, Y))
    _one_line(e, "measure: batches", "looks like one (input, target) batch", "(2,) int64", "pass [batch]")
    assert sparsify.measure(net, [(x, Y)]).samples == 2


def test_batches_of_different_sizes_are_still_batches(mlp):
    assert sparsify.measure(mlp, (torch.zeros(2, 8), torch.zeros(3, 8))).samples == 5


@pytest.mark.parametrize("model, batch, parts", [
    ("mlp", torch.zeros(2, 5), ["shapes (2, 5) float32", "mat1 and mat2"]),
    ("resnet", torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["shapes (2, 3, 32, 32) uint8"]),
    ("resnet", torch.zeros(2, 3, 32, 32, dtype=torch.float64), ["shapes (2, 3, 32, 32) float64"]),
    ("resnet", torch.zeros(3, 32, 32), ["shapes (3, 32, 32) float32"]),
], ids=["shape", "uint8", "float64", "unbatched"])
def test_batches_the_first_forward_rejects_are_one_line(model, batch, parts, request):
    with pytest.raises(ValueError) as e:
        sparsify.measure(request.getfixturevalue(model), [batch])
    _one_line(e, "measure: batches do not fit the model", *parts)


def test_an_error_after_a_forward_succeeded_is_the_models_own():
    class FailsLater(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.calls = nn.Linear(8, 4), 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("the model's own error")
            return self.fc(x)

    with pytest.raises(RuntimeError, match="^the model's own error$"):
        sparsify.measure(FailsLater(), [torch.zeros(2, 8), torch.zeros(2, 8)])


# --- measure: dict batches, input_fn, max_batches ---------------------------------------------

def test_hugging_face_dict_batches_are_bound_like_example_inputs(bert):
    model, ids = bert
    r = sparsify.measure(model, [{"input_ids": ids, "labels": Y}])
    assert r.samples == 2 and r.dense_macs > 0
    rec = Recording()
    labels = torch.tensor([1, 2])
    assert sparsify.measure(rec, [{"input_ids": torch.zeros(2, 8), "labels": labels}]).samples == 2
    assert rec.labels == [labels]  # what model(**batch) in the user's loop passes


@pytest.mark.parametrize("model, batch, parts", [
    (Recording, {"input_idz": 1}, ["measure: batches: Recording.forward has no parameter 'input_idz'",
                                   "(it takes input_ids, attention_mask, labels)"]),
    (Recording, {"input_ids": 1, "pixel_values": 2, "extra": 3},
     ["measure: batches: Recording.forward has no parameters 'pixel_values', 'extra'"]),
    # an unannotated one parameter may take a dict (sentence-transformers): tried, then named
    (lambda: nn.Sequential(nn.Linear(8, 4)), {"x": torch.zeros(2, 8)},
     ["measure: batches do not fit the model", "a dict whose keys x name no parameter of Sequential.forward",
      "which takes input"]),
], ids=["no-key-fits", "some-keys-fit", "passed-whole"])
def test_dict_batch_keys_naming_no_parameter_are_listed(model, batch, parts):
    with pytest.raises(ValueError) as e:
        sparsify.measure(model(), [batch])
    _one_line(e, *parts)


def test_dict_batches_for_a_keyword_only_forward_are_named():
    with pytest.raises(ValueError) as e:
        sparsify.measure(KeywordOnly(), [{"x": torch.zeros(2, 8)}])
    _one_line(e, "measure: batches: KeywordOnly.forward takes 'x' by keyword only")


@pytest.mark.parametrize("kwargs, exc, parts", [
    ({"max_batches": "2"}, TypeError, ["measure: max_batches", "got str '2'"]),
    ({"max_batches": 1.5}, TypeError, ["measure: max_batches", "got float 1.5"]),
    ({"max_batches": True}, TypeError, ["measure: max_batches", "got bool True"]),
    ({"max_batches": 0}, ValueError, ["measure: max_batches", "int >= 1", "got 0"]),
    ({"max_batches": -1}, ValueError, ["measure: max_batches", "got -1"]),
    ({"input_fn": 3}, TypeError, ["measure: input_fn is a function", "got int"]),
    ({"input_fn": lambda b: 3}, TypeError, ["measure: input_fn returned a int", "as a tuple"]),
], ids=["max-str", "max-float", "max-bool", "max-0", "max-neg", "input_fn-int", "input_fn-returns-int"])
def test_measure_options_are_checked(mlp, kwargs, exc, parts):
    with pytest.raises(exc) as e:
        sparsify.measure(mlp, [torch.zeros(2, 8)], **kwargs)
    _one_line(e, *parts)


def test_input_fn_may_return_one_tensor_or_a_dict(mlp):
    x = torch.randn(3, 8)
    want = sparsify.measure(mlp, [x]).to_dict()
    assert sparsify.measure(mlp, [{"img": x}], input_fn=lambda b: b["img"]).to_dict() == want  # not its rows
    assert sparsify.measure(mlp, [x], input_fn=lambda b: {"input": b}).to_dict() == want
    assert sparsify.measure(mlp, [x, x], max_batches=1).samples == 3


# --- finalize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model, inputs, parts", [
    ("mlp", torch.zeros(2, 5), ["shapes (2, 5) float32", "mat1 and mat2"]),
    ("resnet", torch.zeros(1, 1, 32, 32), ["shapes (1, 1, 32, 32) float32", "3 channels"]),
    ("resnet", torch.zeros(1, 3, 32, 32, dtype=torch.float64), ["shapes (1, 3, 32, 32) float64"]),
], ids=["shape", "channels", "dtype"])
def test_finalize_example_inputs_that_do_not_fit_are_one_line(model, inputs, parts, request):
    with pytest.raises(ValueError) as e:
        _quiet(sparsify.finalize, request.getfixturevalue(model), inputs)
    _one_line(e, "finalize: example_inputs do not fit the model", *parts)


def test_finalize_accelerated_without_the_check_says_inputs_do_not_fit(request):
    # check=False skips the comparison that ran the inputs first: the acceleration then failed in torch
    with pytest.raises(ValueError) as e:
        _quiet(sparsify.finalize, request.getfixturevalue("resnet"), torch.zeros(1, 1, 32, 32), check=False,
               accelerate=True)
    _one_line(e, "finalize: example_inputs do not fit the model", "3 channels")


def test_finalize_dict_keys_naming_no_parameter(bert):
    model, ids = bert
    with pytest.raises(ValueError) as e:
        _quiet(sparsify.finalize, model, {"input_idz": ids})
    _one_line(e, "example_inputs: BertForSequenceClassification.forward has no parameter 'input_idz'",
              "(it takes input_ids, attention_mask")


@pytest.mark.parametrize("kwargs, exc, parts", [
    ({"rtol": -1}, ValueError, ["finalize: rtol", "finite number >= 0", "got -1"]),
    ({"atol": math.nan}, ValueError, ["finalize: atol", "got nan"]),
    ({"atol": math.inf}, ValueError, ["finalize: atol", "got inf"]),
    ({"rtol": "a"}, TypeError, ["finalize: rtol", "got str 'a'"]),
    ({"accelerate": {"foo": 1}}, TypeError, ["finalize: accelerate has no option 'foo'", "decide"]),
    ({"accelerate": "yes"}, TypeError, ["finalize: accelerate is True, False or a dict", "got str 'yes'"]),
    ({"accelerate": 1.5}, TypeError, ["finalize: accelerate", "got float 1.5"]),
    ({"check": "no"}, TypeError, ["finalize: check is True or False", "got 'no'"]),
    ({"check": 1}, TypeError, ["finalize: check", "got 1"]),
    ({"semi_structured": "yes"}, TypeError, ["finalize: semi_structured", "got str 'yes'"]),
    ({"example_inputs": torch.zeros(0, 8)}, ValueError, ["finalize: example_inputs hold 0 samples", "(0, 8)"]),
], ids=["rtol-neg", "atol-nan", "atol-inf", "rtol-str", "accelerate-key", "accelerate-str", "accelerate-float",
        "check-str", "check-int", "semi-str", "empty-batch"])
def test_finalize_options_are_checked(mlp, kwargs, exc, parts):
    with pytest.raises(exc) as e:
        _quiet(sparsify.finalize, mlp, **kwargs)
    _one_line(e, *parts)


# --- sparsify: example_inputs ------------------------------------------------------------------

def test_sparsify_refuses_an_empty_example_batch():
    with pytest.raises(ValueError) as e:
        sparsify.sparsify(nn.Sequential(nn.Linear(8, 4)), "st3", example_inputs=torch.zeros(0, 8))
    _one_line(e, "example_inputs hold 0 samples", "(0, 8) float32")


@pytest.mark.parametrize("model, inputs, parts", [
    (KeywordOnly, {"x": torch.zeros(2, 8)}, ["example_inputs: KeywordOnly.forward takes 'x' by keyword only",
                                             "positional parameter"]),
    (lambda: torchvision.models.resnet18(num_classes=10), {"pixel_values": X},
     ["example_inputs: ResNet.forward has no parameter 'pixel_values' (it takes x)"]),
    (lambda: nn.Sequential(nn.Linear(8, 4)), {"features": torch.zeros(2, 8)},
     ["example_inputs do not fit the model", "a dict whose keys features name no parameter of Sequential.forward",
      "which takes input"]),
    (lambda: nn.Sequential(nn.Linear(8, 4)), {}, ["example_inputs: an empty dict names no argument"]),
], ids=["keyword-only", "annotated-tensor", "dict-passed-whole", "empty-dict"])
def test_example_input_dicts_that_cannot_bind_are_one_line(model, inputs, parts):
    with pytest.raises(ValueError) as e:
        sparsify.sparsify(model(), "st3", example_inputs=inputs)
    _one_line(e, *parts)


def test_sparsify_bert_dict_naming_no_parameter():
    transformers, cfg = _bert_config()
    with pytest.raises(ValueError) as e:
        sparsify.sparsify(transformers.BertForSequenceClassification(cfg), "st3",
                          example_inputs={"input_idz": torch.zeros(2, 12, dtype=torch.long)})
    _one_line(e, "example_inputs: BertForSequenceClassification.forward has no parameter 'input_idz'")


def test_a_keyword_only_model_trains_without_example_inputs():
    """What the keyword-only message leaves open: the model itself sparsifies, and its own calls work."""
    model = _quiet(sparsify.sparsify, KeywordOnly(), "st3", begin=0, end=1, fix=None)
    assert model(x=torch.zeros(2, 8)).shape == (2, 4)
