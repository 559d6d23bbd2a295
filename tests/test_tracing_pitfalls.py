"""Code that asks questions of its inputs which a traced value answers wrongly, from libraries
beyond torchvision / timm / transformers (found by calling diffusers' models as their users do)."""
from __future__ import annotations

import copy as copy_module
import io
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import passes.tracing
import sparsify


class TimestepNet(nn.Module):
    """diffusers' UNet timestep handling: Python numbers become a tensor, tensors pass through."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.emb = nn.Linear(1, 8)

    def forward(self, sample, timestep):
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        return self.conv(sample) + self.emb(timesteps.float()[:, None])[:, :, None, None]


def test_is_tensor_of_a_traced_value_takes_the_tensor_branch():
    """``torch.is_tensor(Proxy)`` was False: the graph held the branch for Python numbers and the
    first training forward on the very example inputs raised deep in generated code."""
    torch.manual_seed(0)
    model = TimestepNet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "st3", example_inputs=(x, t), total_steps=3, copy=True)
    m.train()
    out = m(x, t)
    assert torch.allclose(out, model(x, t), atol=1e-6)  # step 0: nothing pruned yet
    out.square().mean().backward()
    assert m.conv.weight.grad is not None


@dataclass
class DecoderOutput(OrderedDict):
    """diffusers' ``BaseOutput`` / transformers' ``ModelOutput``: a dataclass that is a dict."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return DecoderOutput(sample=self.out(self.act(self.conv(x))))


def test_a_dataclass_dict_output_keeps_its_type():
    """A traced root returned a plain dict in training (``vae(x).sample`` raised AttributeError),
    the output class in eval (its own forward): the graph's dict is turned back into the class,
    also after finalize, deepcopy and pickling."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for recipe in ("st3", "semi-structured"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = sparsify.sparsify(Decoder(), recipe, example_inputs=(x,), total_steps=3)
            assert isinstance(m, torch.fx.GraphModule)
            for mode in (m.train, m.eval):
                mode()
                out = m(x)
                assert type(out) is DecoderOutput and out.sample.shape == (2, 3, 8, 8), recipe
            for copy in (sparsify.finalize(m), copy_module.deepcopy(m), pickle.loads(pickle.dumps(m))):
                assert type(copy.eval()(x)) is DecoderOutput, recipe


class CrossNet(nn.Module):
    """A UNet-like call: ``net(sample, timestep, encoder_hidden_states=..., return_dict=True)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ctx = nn.Linear(4, 8)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        h = F.gelu(self.conv(sample)) + self.ctx(encoder_hidden_states).mean(1)[:, :, None, None]
        h = self.out(F.gelu(h)) * timestep[:, None, None, None]
        return h if return_dict else (h,)


def test_an_exported_graph_serves_keyword_calls():
    """``example_inputs`` are positional; a graph captured by torch.export took only calls of that
    exact form, so ``net(x, t, encoder_hidden_states=e)`` ran the original forward: tl1's penalty
    0 for the whole run, with a warning whose advice (pass such example_inputs) cannot be taken."""
    torch.manual_seed(0)
    x, t, e = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(CrossNet(), "tl1", example_inputs=(x, t, e), total_steps=3, capture="export")
    m.train()
    want = m(x, t, e)
    expected = float(sparsify.penalty(m))
    assert expected > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "called with arguments its graph was not traced for"
        for call in (lambda: m(x, t, encoder_hidden_states=e), lambda: m(sample=x, timestep=t, encoder_hidden_states=e),
                     lambda: m(x, t, e, return_dict=True)):
            assert torch.equal(call(), want)
            assert float(sparsify.penalty(m)) == expected
    with warnings.catch_warnings(record=True) as caught:  # another value than the example's: own forward, said
        warnings.simplefilter("always")
        assert torch.equal(m(x, t, e, return_dict=False)[0], want)
    assert any("not traced for" in str(w.message) for w in caught)


class LayoutBlock(nn.Module):
    """diffusers' ``ResnetBlock2D``: ``if self.training: x = x.contiguous()`` before the shortcut;
    ``scale`` makes the branch change values instead (then the graph holds one mode only)."""

    def __init__(self, scale: bool = False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(3, 8, 1)
        self.scale = scale

    def forward(self, x):
        h = self.conv2(F.silu(self.conv1(x)))
        if self.training:
            x = x * 2 if self.scale else x.contiguous()
        return F.silu(h + self.shortcut(x))


def test_a_training_branch_that_only_changes_layout_serves_eval():
    """The graph held the training branch, so every eval call ran the module's own forward without
    the semi-structured masks: the deployed model was not the trained one, and finalize's check
    compared that forward with itself."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for scale in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = sparsify.sparsify(LayoutBlock(scale), "semi-structured", example_inputs=(x,), total_steps=3)
            with torch.no_grad():
                trained = m.train()(x)
                evaluated = m.eval()(x)
        eager = [w for w in caught if "was called in eval mode" in str(w.message)]
        modes = m._call_guard.modes if m._call_guard is not None else {}  # None: every call fits
        if scale:  # values differ by mode: the graph is the training one, eval runs its own forward, said
            assert ("", "training") in modes and eager
            with warnings.catch_warnings(record=True) as caught:  # and finalize says its check cannot see it
                warnings.simplefilter("always")
                sparsify.finalize(m, (x,))
            assert any("holds the training branch" in str(w.message) and "conv1_pmask" in str(w.message)
                       for w in caught)
        else:
            assert ("", "training") not in modes and not eager
            assert torch.equal(trained, evaluated)
            final = sparsify.finalize(m, (x,))
            assert torch.equal(final.eval()(x), trained)


class LabelDropNet(nn.Module):
    """DiT's class conditioning: in training, labels are replaced by the null class with
    probability ``drop`` (a buffer: 0 when captured, raised later)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(11, 8)  # class 10: the null class
        self.register_buffer("drop", torch.tensor(0.0))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x, labels):
        if self.training:
            labels = torch.where(torch.rand(labels.shape[0]) < self.drop, torch.full_like(labels, 10), labels)
        return self.out(F.gelu(self.conv(x) + self.table(labels)[:, :, None, None]))


def test_an_exported_training_only_random_draw_does_not_serve_eval():
    """torch.export captures the training branch with its random draw; the one eval comparison
    passed (the draw changed nothing on the example), so eval and the finalized model replaced
    labels at random. Eval calls now run the module's own forward."""
    from passes.export_capture import _random_only_in_training, export_trace
    torch.manual_seed(0)
    x, labels = torch.randn(8, 3, 8, 8), torch.arange(8)
    net = LabelDropNet()
    assert _random_only_in_training(net, export_trace(net.train(), (x, labels)).module, (x, labels))
    plain = LabelDropNet()
    plain.forward = lambda x, labels: plain.out(F.gelu(plain.conv(x) + plain.table(labels)[:, :, None, None]))
    assert not _random_only_in_training(plain, export_trace(plain.train(), (x, labels)).module, (x, labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(net, "tl1", example_inputs=(x, labels), total_steps=3, capture="export")
        m.drop.fill_(0.5)
        want = net.eval()(x, labels)
        for _ in range(3):
            assert torch.equal(m.eval()(x, labels), want)


class SkipUp(nn.Module):
    """MONAI's ``UpCat``: the skip input is used only ``if torch.jit.isinstance(x_e, torch.Tensor)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, skip):
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            x = x + skip
        return self.conv(x)


class SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 3, padding=1)
        self.up = SkipUp()

    def forward(self, x):
        return self.up(torch.relu(self.stem(x)), x)


def test_jit_isinstance_of_a_traced_value_keeps_the_skip_connection():
    """``torch.jit.isinstance(Proxy, torch.Tensor)`` was False: the graph dropped the skip input,
    silently here (shapes fit; 1.8 off at sparsity 0, and finalize agreed with the wrong graph),
    with a channel-count crash in MONAI's BasicUNet."""
    torch.manual_seed(0)
    net, x = SkipNet(), torch.randn(2, 4, 8, 8)
    for recipe in ("st3", "tl1"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = sparsify.sparsify(net, recipe, example_inputs=(x,), total_steps=3, copy=True)
        assert torch.equal(m.eval()(x), net(x)), recipe


class PoolByIndex(nn.Module):
    """PyG's ``global_mean_pool``: the number of graphs is ``int(batch.max()) + 1``, data-dependent."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, batch):
        out = torch.zeros(int(batch.max()) + 1, 4).index_add(0, batch, F.relu(self.lin(x)))
        return out


def test_a_failed_export_attempt_prints_nothing(capfd):
    """torch.export printed the partial graph of every failed attempt to stderr (about 250 lines
    per sparsify / plan call of a PyG model); the failure is one line of the plan."""
    x, batch = torch.randn(6, 8), torch.tensor([0, 0, 0, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sparsify.plan(PoolByIndex(), "tl1", example_inputs=(x, batch), capture="export")
        except ValueError as e:
            assert "torch.export could not capture" in str(e)
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err, err[:300]


class Einops(nn.Module):
    """einops' ``Rearrange`` layer: asks its input's type, which a traced value does not answer."""

    def forward(self, x):
        if type(x) is not torch.Tensor:
            raise RuntimeError(f"Tensor type unknown to einops {type(x)}")
        return x.flatten(2).transpose(1, 2)


class PatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(Einops(), nn.Linear(3, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        for _ in range(int(h.shape[1] > 0)):  # untraceable root: its children are traced one by one
            h = h * 1
        return self.head(h.mean(1))


def test_each_untraceable_submodule_is_listed_once():
    """A culprit forced to a leaf was listed again when its parent fell back too (the warning's
    count said 3 submodules for 2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(PatchNet(), "st3", example_inputs=(torch.randn(2, 3, 4, 4),))
    names = [f["name"] for f in plan.fallbacks]
    assert len(names) == len(set(names)) and "embed.0" in names, names


class CachedBias(nn.Module):
    """timm's LeViT / EfficientFormerV2 attention: in eval mode the bias is computed once per
    device and kept in a plain dict attribute."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache: dict = {}

    def forward(self, x):
        if self.training:
            return self.fc(x) + self.bias * 2
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.fc(x) + self.cache[key]


class CachedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = CachedBias(), CachedBias()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_cache_filled_while_traced_keeps_no_proxy():
    """Tracing the eval branch (to see whether a training-only branch changes values) stored a
    proxy in an empty cache: ``plan`` of timm's levit_128s / efficientformerv2_s0 raised KeyError
    (the next trace wired the stale proxy into its graph), and the model's own eval forward
    then returned a proxy."""
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    for example in (None, x):
        model = CachedNet()
        expected = copy_module.deepcopy(model).eval()(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = sparsify.plan(model, "tl1", example_inputs=example)
            m = sparsify.sparsify(model, "tl1", example_inputs=example, copy=True)
        assert len(plan.rewritten) == 1
        assert all(not isinstance(v, torch.fx.Proxy) for c in (model.a, model.b, m.a, m.b) for v in c.cache.values())
        copy_module.deepcopy(m)
        assert torch.equal(m.eval()(x), expected)
        assert torch.equal(model.eval()(x), expected)


class DropPath(nn.Module):
    """timm's DropPath: a random per-sample drop in training, the identity in eval."""

    def forward(self, x):
        if not self.training:
            return x
        return x * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.9) / 0.9


class DropBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.drop_path = DropPath()

    def forward(self, x):
        return x + self.drop_path(self.act(self.conv(x)))


class ShapeCheckedNet(nn.Module):
    """segmentation_models_pytorch's models in small: the root branches on the input size (torch.fx
    cannot trace it), the blocks under it use stochastic depth."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = DropBlock()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, 1))
        return self.head(self.block(self.stem(x)))


@pytest.mark.parametrize("recipe", sorted(sparsify.builtin_recipes()))
def test_a_block_under_an_untraceable_root_is_traced_again_from_its_modules(recipe):
    """sparsify traces twice when the rules need less depth than the first trace went; below an
    untraceable root, the second trace read the first one's graph of each child, traced through
    the stochastic depth and so holding its training branch: in eval (and in the finalized
    model) the block ran its own forward without the semi-structured masks (smp's Segformer)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the root is untraceable: said, expected
        m = sparsify.sparsify(ShapeCheckedNet(), recipe, example_inputs=(x,), total_steps=4)
    assert isinstance(m.block, torch.fx.GraphModule)
    assert "drop_path" in [n.target for n in m.block.graph.nodes if n.op == "call_module"]
    guard = m.block.__dict__.get("_call_guard")
    assert guard is None or not guard.modes  # no branch baked: the graph serves eval too
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsify.FinalizeWarning)
        sparsify.finalize(m)


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, mask=None):
        return self.fc(x) if mask is None else self.fc(x) * mask


def test_reloading_a_graph_traced_for_a_none_argument_leaves_torch_fx_working():
    """A graph traced with ``mask=None`` calls torch.fx's ``_assert_is_none``; traced again on
    unpickling, torch marked that call as wrapped and the reloaded code registered
    ``wrap("torch.fx._symbolic_trace._assert_is_none")``: every later trace in the process then
    raised KeyError (a transformers ViT saved after sparsify, reloaded twice)."""
    gm = passes.tracing.trace(OptionalMask(), concrete_args={"mask": None}).module
    for _ in range(2):
        buf = io.BytesIO()
        torch.save(gm, buf)
        buf.seek(0)
        gm = torch.load(buf, weights_only=False)  # our own pickle, made just above
    torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), gm.fc(x))
