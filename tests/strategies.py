"""Hypothesis strategies for random fx-traceable models and random recipes.

Reusable by every test file (``from strategies import ...``; pytest puts ``tests/`` on the path).

Models are described by a :class:`ModelSpec` (plain, printable data, so hypothesis shows a
readable failing example and shrinks it) and built with :func:`build_model`, which seeds torch
from ``spec.seed``: building the same spec twice gives identical weights, which is what "a fresh
sparsify of the same model" needs. :func:`example_input` gives a matching deterministic input.

Families (``spec.dim``):

* ``2``: images ``(batch, C, L, L)``: Conv2d (random channels, kernel 1–3, stride 1–2, padding,
  groups incl. depthwise, bias or not), BatchNorm2d, ReLU / GELU modules and ``F.relu`` calls,
  residual adds (custom ``Residual`` modules, so tracing has to descend into them), concat of two
  conv branches (``Concat``), max / avg pooling, a parameterised leaf with no Conv/Linear inside
  (``ScaleShift``: tracing should keep it a leaf), then a head: flatten (``torch.flatten`` or
  ``nn.Flatten``, or global average pooling first) and one or two Linear layers;
* ``1``: the same with Conv1d / BatchNorm1d / 1-d pooling on ``(batch, C, L)``;
* in both, a weight block may be a ConvTranspose1d/2d instead (random kernel 1–3, stride 1–2
  while the map is small, padding, output padding, bias or not; groups 1);
* ``0``: MLPs on ``(batch, F)``: Linear, BatchNorm1d, activations, residual and concat of Linears.

Strategies:

* ``model_specs(dims=(0, 1, 2), max_blocks=5)`` -> :class:`ModelSpec`;
* ``recipes(model, sparsity=None, max_rules=4)`` -> a recipe dict for an already built model:
  a rule of one weight method (``WEIGHT_METHODS``: st3 / st3σ, magnitude with its scopes and
  blocks, N:M with several n and m, STR at every granularity, l1-prune) over a random subset of
  the weight types present, then random later rules: ``"method": null`` exclusions by name glob
  (exact names, ``*`` within a component, ``prefix.**`` across), by ``type``, ``first`` / ``last``
  or ``depthwise``, and re-inclusions with other params. ``sparsity=0.0`` pins every sparsity and
  draws only the methods that have one (for "at sparsity 0 outputs equal the original's"). Times
  are step counts.
* ``models_and_recipes(...)`` -> ``(spec, model, recipe)`` drawn together.

Helpers: :func:`weight_layer_names`, :func:`quiet_sparsify` (``sparsify`` with its "rule matched
nothing" / fallback warnings silenced: random recipes produce them on purpose).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import sparsify

__all__ = ["ModelSpec", "model_specs", "build_model", "example_input", "recipes", "models_and_recipes",
           "weight_layer_names", "quiet_sparsify", "WEIGHT_TYPES", "count_example", "examples_run"]

WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d)

_EXAMPLES = [0]


def count_example() -> None:
    """Called first in every property: tests/conftest.py prints the total examples run."""
    _EXAMPLES[0] += 1


def examples_run() -> int:
    return _EXAMPLES[0]


@dataclass(frozen=True)
class ModelSpec:
    """A random model: input shape and a tuple of block descriptions (tuples of plain values)."""

    dim: int  # 0: (B, F) MLP, 1: (B, C, L), 2: (B, C, L, L)
    in_channels: int
    size: int  # spatial length (ignored for dim 0)
    blocks: tuple
    head: tuple
    seed: int

    def input_shape(self, batch: int = 2) -> tuple:
        return (batch, self.in_channels) + (self.size,) * self.dim


# ---------------------------------------------------------------------------------------------
# modules the random models are made of
# ---------------------------------------------------------------------------------------------

class Residual(nn.Module):
    """``x + body(x)``: tracing has to descend into it to reach the layers of ``body``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    """``cat([a(x), b(x)], dim=1)``."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class FunctionalReLU(nn.Module):
    """An ``F.relu`` call node rather than a ReLU module node."""

    def forward(self, x):
        return F.relu(x)


class ScaleShift(nn.Module):
    """A learnable per-channel affine map with no Conv/Linear inside: should stay a leaf."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        shape = (1, channels) + (1,) * dim
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(shape))
        self.shift = nn.Parameter(0.1 * torch.randn(shape))

    def forward(self, x):
        return x * self.scale + self.shift


class RandomNet(nn.Module):
    """Blocks in sequence, then the head."""

    def __init__(self, blocks: list[nn.Module], head: list[nn.Module], flatten_fn: bool):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*head)
        self.flatten_fn = flatten_fn

    def forward(self, x):
        x = self.blocks(x)
        if self.flatten_fn:
            x = torch.flatten(x, 1)
        return self.head(x)


# ---------------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _conv(draw, c: int, size: int, *, same: bool = False):
    """A conv block spec ``("conv", cin, cout, k, stride, pad, groups, bias)`` and the new (c, size).
    ``same``: keep channels and size (for residual bodies)."""
    groups = draw(st.sampled_from(_divisors(c)))
    if same:
        cout = c
    else:
        cout = groups * draw(st.integers(1, max(1, 8 // groups)))
    k = draw(st.sampled_from([1, 3] if same else [1, 2, 3]))
    k = min(k, size) if not same else k
    stride = 1 if same else draw(st.integers(1, 2))
    pad = k // 2 if same else draw(st.integers(0, k // 2))
    bias = draw(st.booleans())
    new_size = (size + 2 * pad - k) // stride + 1
    return ("conv", c, cout, k, stride, pad, groups, bias), cout, new_size


@st.composite
def _convt(draw, c: int, size: int):
    """A transposed conv spec ``("convt", cin, cout, k, stride, pad, output_padding, bias)`` and the
    new (c, size); stride 2 only while the map is small (the flattened head stays small)."""
    cout = draw(st.integers(1, 8))
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.integers(1, 2)) if size <= 6 else 1
    pad = draw(st.integers(0, (k - 1) // 2))  # the output keeps at least one position
    out_pad = draw(st.integers(0, stride - 1))
    new_size = (size - 1) * stride - 2 * pad + k + out_pad
    return ("convt", c, cout, k, stride, pad, out_pad, draw(st.booleans())), cout, new_size


@st.composite
def _linear(draw, f: int, *, same: bool = False):
    out = f if same else draw(st.integers(1, 12))
    return ("linear", f, out, draw(st.booleans())), out


@st.composite
def _block(draw, dim: int, c: int, size: int):
    kinds = ["weight", "weight", "bn", "act", "residual", "concat", "leaf"]
    if dim and size >= 2:
        kinds.append("pool")
    kind = draw(st.sampled_from(kinds))
    if kind == "bn":
        return ("bn", c), c, size
    if kind == "act":
        return ("act", draw(st.sampled_from(["relu", "gelu", "frelu"]))), c, size
    if kind == "leaf":
        return ("leaf", c), c, size
    if kind == "pool":
        return ("pool", draw(st.sampled_from(["max", "avg"]))), c, size // 2
    if kind == "weight":
        if dim == 0:
            spec, f = draw(_linear(c))
            return spec, f, size
        return draw(_convt(c, size)) if draw(st.integers(0, 3)) == 0 else draw(_conv(c, size))
    if kind == "residual":
        if dim == 0:
            body, _ = draw(_linear(c, same=True))
        else:
            body, _, _ = draw(_conv(c, size, same=True))
        return ("residual", body, draw(st.sampled_from(["relu", "gelu", None]))), c, size
    # concat: two branches that keep the size and change the channels
    if dim == 0:
        a, fa = draw(_linear(c))
        b, fb = draw(_linear(c))
        return ("concat", a, b), fa + fb, size
    branches = []
    for _ in range(2):
        groups = draw(st.sampled_from(_divisors(c)))
        cout = groups * draw(st.integers(1, max(1, 6 // groups)))
        k = draw(st.sampled_from([1, 3]))
        branches.append(("conv", c, cout, k, 1, k // 2, groups, draw(st.booleans())))
    return ("concat", *branches), branches[0][2] + branches[1][2], size


@st.composite
def model_specs(draw, dims=(0, 1, 2), max_blocks: int = 5) -> ModelSpec:
    """A random :class:`ModelSpec`; see the module docstring for what models contain."""
    dim = draw(st.sampled_from(list(dims)))
    c0 = draw(st.integers(1, 6))
    size0 = draw(st.integers(3, 10)) if dim else 0
    c, size = c0, size0
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        spec, c, size = draw(_block(dim, c, size))
        blocks.append(spec)
    if dim:
        flatten = draw(st.sampled_from(["fn", "module", "gap"]))
        features = c if flatten == "gap" else c * size ** dim
    else:
        flatten, features = None, c
    hidden = draw(st.sampled_from([None, 8]))
    head = (flatten, features, hidden, draw(st.integers(1, 5)), draw(st.sampled_from(["relu", "gelu"])))
    return ModelSpec(dim, c0, size0, tuple(blocks), head, draw(st.integers(0, 2 ** 16)))


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {(1, "max"): nn.MaxPool1d, (2, "max"): nn.MaxPool2d, (1, "avg"): nn.AvgPool1d, (2, "avg"): nn.AvgPool2d}
_GAP = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "frelu": FunctionalReLU()}[name]


def _make(dim: int, spec: tuple) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        _, cin, cout, k, stride, pad, groups, bias = spec
        return _CONV[dim](cin, cout, k, stride=stride, padding=pad, groups=groups, bias=bias)
    if kind == "convt":
        _, cin, cout, k, stride, pad, out_pad, bias = spec
        return _CONVT[dim](cin, cout, k, stride=stride, padding=pad, output_padding=out_pad, bias=bias)
    if kind == "linear":
        _, fin, fout, bias = spec
        return nn.Linear(fin, fout, bias=bias)
    if kind == "bn":
        bn = _BN[dim](spec[1])
        with torch.no_grad():  # non-trivial statistics so eval differs from train
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        return bn
    if kind == "act":
        return _act(spec[1])
    if kind == "leaf":
        return ScaleShift(spec[1], dim)
    if kind == "pool":
        return _POOL[(dim, spec[1])](2)
    if kind == "residual":
        body = _make(dim, spec[1])
        return Residual(body if spec[2] is None else nn.Sequential(body, _act(spec[2])))
    if kind == "concat":
        return Concat(_make(dim, spec[1]), _make(dim, spec[2]))
    raise ValueError(kind)


def build_model(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` describes, with weights drawn from ``torch.manual_seed(spec.seed)``."""
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        blocks = [_make(spec.dim, b) for b in spec.blocks]
        flatten, features, hidden, out, act = spec.head
        head: list[nn.Module] = []
        if flatten == "gap":
            head += [_GAP[spec.dim](1), nn.Flatten()]
        elif flatten == "module":
            head.append(nn.Flatten())
        if hidden:
            head += [nn.Linear(features, hidden), _act(act), nn.Linear(hidden, out)]
        else:
            head.append(nn.Linear(features, out))
        return RandomNet(blocks, head, flatten_fn=flatten == "fn")


def example_input(spec: ModelSpec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic input of the spec's shape (``seed`` picks another one)."""
    g = torch.Generator().manual_seed(spec.seed * 7919 + seed)
    return torch.randn(spec.input_shape(batch), generator=g)


def weight_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every Conv/Linear module, in ``named_modules`` order."""
    return [n for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]


def quiet_sparsify(model, recipe, **kwargs):
    """``sparsify.sparsify`` with its warnings (rules matching nothing, fallbacks) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(model, recipe, **kwargs)


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

def _sparsity(fixed):
    if fixed is not None:
        return st.just(fixed)
    return st.one_of(st.just(0.0), st.floats(0.0, 0.99), st.sampled_from([0.5, 0.9]))


@st.composite
def _glob(draw, names: list[str]):
    name = draw(st.sampled_from(names))
    parts = name.split(".")
    form = draw(st.sampled_from(["exact", "star", "globstar"]))
    if form == "star":
        parts[draw(st.integers(0, len(parts) - 1))] = "*"
        return ".".join(parts)
    if form == "globstar" and len(parts) > 1:
        return ".".join(parts[:draw(st.integers(1, len(parts) - 1))]) + ".**"
    return name


#: the weight methods :func:`recipes` draws; those with a ``sparsity`` (pinned by ``sparsity=0.0``)
WEIGHT_METHODS = ("st3", "magnitude", "nm", "str", "l1-prune")
SPARSITY_METHODS = ("st3", "magnitude", "l1-prune")


def _weight_params(draw, method: str, sparsity) -> dict:
    """A rule's params for ``method``, every option that changes what it computes drawn."""
    if method == "st3":
        return {"sparsity": draw(_sparsity(sparsity)), "sigma": draw(st.booleans())}
    if method == "magnitude":
        return {"sparsity": draw(_sparsity(sparsity)), "scope": draw(st.sampled_from(["global", "layer"])),
                "block": draw(st.sampled_from([None, [2, 1], [1, 2]]))}
    if method == "nm":
        return {"n": draw(st.integers(1, 3)), "m": draw(st.sampled_from([4, 8])),
                "decay": draw(st.sampled_from([0.0, 2e-4]))}
    if method == "str":
        return {"s_init": draw(st.sampled_from([-8.0, -3.0, -1.0])),
                "granularity": draw(st.sampled_from(["layer", "channel", "global"]))}
    return {"l1": draw(st.sampled_from([0.0, 1e-3])), "sparsity": draw(_sparsity(sparsity)),
            "prune_at": draw(st.sampled_from([0.0, 0.5, 1.0]))}


@st.composite
def recipes(draw, model: nn.Module, sparsity: float | None = None, max_rules: int = 4) -> dict:
    """A random recipe of one weight method for ``model`` (see the module docstring)."""
    names = weight_layer_names(model)
    present = sorted({type(m).__name__ for m in model.modules() if isinstance(m, WEIGHT_TYPES)})
    types = draw(st.lists(st.sampled_from(present), min_size=1, unique=True)) if present else ["Conv2d"]
    method = draw(st.sampled_from(SPARSITY_METHODS if sparsity is not None else WEIGHT_METHODS))
    rules = [{"match": {"type": types}, "method": method, "params": _weight_params(draw, method, sparsity)}]
    for _ in range(draw(st.integers(0, max_rules - 1))):
        kind = draw(st.sampled_from(["name_null", "type_null", "flag_null", "reinclude"]))
        if kind == "name_null" and names:
            rules.append({"match": {"name": draw(_glob(names))}, "method": None})
        elif kind == "type_null":
            rules.append({"match": {"type": draw(st.sampled_from(present or ["Linear"]))}, "method": None})
        elif kind == "flag_null":
            flag = draw(st.sampled_from(["first", "last", "depthwise"]))
            rules.append({"match": {flag: True}, "method": None})
        elif kind == "reinclude" and names:
            rules.append({"match": {"name": draw(_glob(names))}, "method": method,
                          "params": _weight_params(draw, method, sparsity)})
    begin = draw(st.integers(0, 3))
    end = begin + draw(st.integers(0, 4))
    fix = draw(st.one_of(st.none(), st.integers(end, end + 4)))
    return {"version": 1, "name": "random", "schedule": {"begin": begin, "end": end, "fix": fix}, "rules": rules}


@st.composite
def models_and_recipes(draw, dims=(0, 1, 2), sparsity: float | None = None, max_blocks: int = 5):
    """``(spec, model, recipe)``: a random model and a random recipe that names its layers."""
    spec = draw(model_specs(dims=dims, max_blocks=max_blocks))
    model = build_model(spec)
    return spec, model, draw(recipes(model, sparsity=sparsity))
