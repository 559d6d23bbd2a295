"""Guards for core and integration edges a second mutation probe found unguarded: tied users (a
forward through the tied embedding alone counts as a forward of the sparse layer, a tied Linear
deploys its owner's sparse weight, a sparse-gradient embedding is refused, a scaled embedding's
non-persistent buffer stays out of the finalized state_dict), load_state_dict's pre-hook (masks
saved under their former nested names load, a refusal names every difference it counts and a
rule added), pack's fixed size, the dead-outputs message, direct parameter reads inside a list or
as a keyword, Conv/Linear subclasses (_conv_forward overrides stay dense, timm's Linear is
rewritten), penalty terms left out of copies and pickles, and the Lightning integration (a wrapped
network stepped once, sparsify_as_saved's keywords and its refusal of a sparsified root; the
callback's own cases are in tests/test_lightning_callback_steps.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify.core.layers import SparseWeightMixin
from warned import said


# --- tied users --------------------------------------------------------------------------------

class TiedLM(nn.Module):
    """An embedding tied to the LM head (tie_word_embeddings)."""

    def __init__(self, sparse_grad=False):
        super().__init__()
        self.emb = nn.Embedding(16, 8, sparse=sparse_grad)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


IDS = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
BYPASSED = "no forward with gradients ran through its sparse layers"


def test_a_step_that_trains_through_the_tied_embedding_alone_is_not_called_bypassed():
    """A loss computed from the tied embedding's lookup (which reads the head's effective weight)
    is a forward through the sparse layer: sparsify.step does not say the loop trains another model."""
    torch.manual_seed(0)
    m = sparsify.sparsify(TiedLM(), "gmp", example_inputs=IDS, total_steps=4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.emb(IDS).square().mean().backward()
    opt.step()
    assert not [w for w in said(sparsify.step, m) if BYPASSED in w]


def test_an_embedding_with_sparse_gradients_cannot_share_the_heads_mask():
    """sparse=True needs the leaf weight in F.embedding (its gradient is sparse); reading the
    head's effective weight would silently make it dense: refused, naming why."""
    with pytest.raises(ValueError, match="emb: an Embedding with sparse=True needs a leaf weight"):
        sparsify.sparsify(TiedLM(sparse_grad=True), "gmp", example_inputs=IDS, total_steps=4)


def test_a_tied_linear_is_measured_with_its_owners_sparse_weight():
    """Two Linears sharing one matrix compute with one mask: measure counts both at the owner's
    non-zero weights (the tied one deploys the owner's sparse weight, not the dense latent one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    x = torch.randn(3, 6)
    m = sparsify.sparsify(model, "gmp", example_inputs=x, total_steps=2, begin=0, end=0, sparsity=0.5)
    nnz = int(m[0].deployed_weight().count_nonzero())
    assert nnz == 18
    assert torch.equal(m[2].deployed_weight(), m[0].deployed_weight())
    rows = {r.name: r for r in sparsify.measure(m, [x]).layers}
    assert rows["0"].mult_macs == rows["2"].mult_macs == nnz  # tanh leaves no input zero


class _ScaledEmbedding(nn.Embedding):
    """A scaled word embedding (Gemma's, BART's): the lookup times a non-persistent buffer."""

    def __init__(self, n, d):
        super().__init__(n, d)
        self.register_buffer("scale", torch.tensor(d ** 0.5), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.scale


class _ScaledLM(TiedLM):
    def __init__(self):
        super().__init__()
        self.emb = _ScaledEmbedding(16, 8)
        self.head.weight = self.emb.weight


def test_a_finalized_scaled_embedding_keeps_its_buffer_out_of_the_state_dict():
    """The finalized tied embedding's scale stays non-persistent: the deployed model's state_dict
    has the keys of the model given to sparsify (what a pretrained checkpoint of it holds)."""
    torch.manual_seed(0)
    model = _ScaledLM()
    keys = sorted(model.state_dict())
    m = sparsify.sparsify(model, "gmp", example_inputs=IDS, total_steps=2, begin=0, end=0, sparsity=0.5)
    final = sparsify.finalize(m.eval(), (IDS,))
    assert type(final.emb) is _ScaledEmbedding and final.emb.weight is final.head.weight
    assert sorted(final.state_dict()) == keys


# --- load_state_dict's pre-hook ----------------------------------------------------------------

def _semi_structured():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU()), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(net, "semi-structured", total_steps=4, example_inputs=torch.zeros(1, 3, 8, 8))


def test_a_checkpoint_with_masks_under_their_former_nested_names_loads():
    """A checkpoint saved when inserted masks sat inside the nested Sequential (0.0_pmask) loads
    into today's model (0_0_pmask), the masks' values included."""
    saved = _semi_structured().state_dict()
    assert "0_0_pmask.mask" in saved
    old = {k.replace("0_0_pmask", "0.0_pmask").replace("0_2_pmask", "0.2_pmask"): v.clone() for k, v in saved.items()}
    old["0.0_pmask.mask"].zero_()
    fresh = _semi_structured()
    fresh.load_state_dict(old)  # strict: every key found
    assert not fresh.state_dict()["0_0_pmask.mask"].any()


def _refusal(saved, here, steps=(4, 4)) -> str:
    def build(recipe, total):
        return sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), recipe, total_steps=total,
                                 example_inputs=torch.zeros(1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rule that decides nothing, said elsewhere
        model, checkpoint = build(here, steps[1]), build(saved, steps[0]).state_dict()
    with pytest.raises(RuntimeError, match="another sparsify") as err:
        model.load_state_dict(checkpoint)
    return str(err.value)


def _recipe(rules):
    return {"version": 1, "name": "mine", "rules": rules}


def _rule(**params):
    return {"match": {"type": "Linear"}, "method": "magnitude", "params": params}


def test_a_refusal_names_three_differences():
    """Three differences (total_steps and two params): all three are named."""
    msg = _refusal(_recipe([_rule(sparsity=0.5, min_density=0.01)]), _recipe([_rule(sparsity=0.6, min_density=0.02)]),
                   steps=(4, 8))
    assert "total_steps: 4 in the checkpoint, 8 here" in msg
    assert "rules[0].params.min_density: 0.01 in the checkpoint, 0.02 here" in msg
    assert "rules[0].params.sparsity: 0.5 in the checkpoint, 0.6 here" in msg and "more" not in msg


def test_a_refusal_names_a_rule_added_to_the_recipe():
    """A recipe with one more rule than the checkpoint's is named by its rules, not as "the recipe"."""
    one = [_rule(sparsity=0.5)]
    msg = _refusal(_recipe(one), _recipe(one + [{"match": {"last": True}, "method": None}]))
    assert "(rules: [" in msg and "in the checkpoint" in msg


# --- extra state, dead outputs ----------------------------------------------------------------

def test_an_extra_state_larger_than_its_like_is_refused():
    """pack keeps one size per module (EMA tools copy entries in place): a state that outgrows
    the size its ``like`` packs to is an error, not a silently longer tensor."""
    from sparsify.core.extra_state import pack
    assert len(pack({"held": ["a"]}, like={"held": ["a", "b"]})) == len(pack({"held": ["a", "b"]}))
    with pytest.raises(ValueError, match="is larger than the"):
        pack({"held": ["a", "b", "c"]}, like={"held": ["a"]})


def test_the_dead_outputs_warning_shows_eight_rows_then_an_ellipsis():
    """A head with 12 dead rows: the warning names the count and the first eight rows only."""
    from sparsify.core.dead_outputs import dead_outputs_message
    msg = dead_outputs_message("sparsify.step", [("fc", list(range(12)), 20)])
    assert "fc: every weight of 12 of its 20 outputs pruned (rows 0, 1, 2, 3, 4, 5, 6, 7 ...)" in msg


# --- direct reads of a parameter (a forward torch.fx cannot trace) ------------------------------

class _Mixer(nn.Module):
    """Untraceable (data-dependent branch); reads ``proj``'s weight as ``how`` says."""

    def __init__(self, how):
        super().__init__()
        self.how, self.inp, self.proj = how, nn.Linear(16, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.inp(x)
        if h.sum() > -1e9:
            if self.how == "list":  # the weight inside a list argument
                h = torch.cat([h, h], -1) @ torch.cat([self.proj.weight, self.proj.weight], 1).t()
            else:  # the weight as a keyword argument
                h = F.linear(h, weight=self.proj.weight)
        return h


class _MixNet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.mix, self.head = _Mixer(how), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mix(x)))


@pytest.mark.parametrize("how, op", [("list", "cat"), ("keyword", "linear")])
def test_a_weight_read_inside_a_list_or_as_a_keyword_keeps_the_layer_dense(how, op):
    """A direct read counts wherever the weight is handed to the op: inside a list argument
    (torch.cat([w, ...])) or as a keyword (F.linear(h, weight=w)); the layer stays dense."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsify.plan(_MixNet(how), "gmp", example_inputs=(x,), total_steps=4)
    entry = next(e for e in plan.entries if e.name == "mix.proj")
    assert entry.method is None and f"read directly by the code around it ({op})" in entry.reason, entry.reason
    assert next(e for e in plan.entries if e.name == "mix.inp").method is not None


# --- Conv/Linear subclasses with their own computation -----------------------------------------

class _StdConv(nn.Conv2d):
    """Weight standardisation written in ``_conv_forward`` (forward is nn.Conv2d's)."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


def test_a_conv_overriding_conv_forward_stays_dense():
    """A subclass that changes only _conv_forward computes its own way: masking its stored weight
    would not make its kernel sparse, so it stays dense, with the reason in the plan."""
    net = nn.Sequential(_StdConv(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    plan = sparsify.plan(net, "gmp", example_inputs=(torch.randn(1, 3, 8, 8),), total_steps=4)
    by_name = {e.name: e for e in plan.entries}
    assert by_name["0"].method is None and "_StdConv computes with its own forward" in by_name["0"].reason
    assert by_name["2"].method is not None


class _Doubled:
    """A mixin whose forward wraps the torch layer's: no subclass of nn.Conv2d itself."""

    def forward(self, x):
        return super().forward(x) * 2


class _DoubledConv(_Doubled, nn.Conv2d):
    pass


def test_a_conv_whose_forward_comes_from_a_mixin_stays_dense():
    """A forward from a mixin (or an intermediate base that is no Conv2d, as torch.ao's QAT
    ConvBn2d's _ConvBnNd) overrides nn.Conv2d's: the layer stays dense, with the own-forward
    warning, and the model computes as before. It was rewritten as a plain sparse conv."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _DoubledConv(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(128, 4))
    x = torch.randn(2, 3, 8, 8)
    before = net(x)
    with pytest.warns(UserWarning, match=r"_DoubledConv computes with its own forward"):
        m = sparsify.sparsify(net, "gmp", total_steps=10, example_inputs=(x,))
    assert type(m[2]) is _DoubledConv and not isinstance(m[2], SparseWeightMixin)
    torch.testing.assert_close(m(x), before)


def test_a_qat_conv_bn_stays_dense():
    """torch.ao's QAT ConvBn2d (BatchNorm folded into the weight, fake-quantised) computes in
    _ConvBnNd.forward, which a plain sparse conv would drop."""
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq
    conv = nniqat.ConvBn2d(8, 8, 3, qconfig=tq.get_default_qat_qconfig("x86"))
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), conv, nn.ReLU(), nn.Flatten(), nn.Linear(128, 4))
    plan = sparsify.plan(net, "gmp", example_inputs=(torch.randn(2, 3, 8, 8),), total_steps=4)
    entry = next(e for e in plan.entries if e.name == "2")
    assert entry.method is None and "ConvBn2d computes with its own forward" in entry.reason, entry.reason


def test_timms_linear_is_rewritten_and_finalizes_to_its_class():
    """timm's Linear (F.linear on self.weight as it is) is sparsified by the weight methods and
    finalizes back to timm's class."""
    timm_layers = pytest.importorskip("timm.layers", reason="timm is not installed")
    torch.manual_seed(0)
    net = nn.Sequential(timm_layers.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    m = sparsify.sparsify(net, "gmp", example_inputs=torch.randn(2, 8), total_steps=2, begin=0, end=0,
                          sparsity=0.5)
    assert isinstance(m[0], SparseWeightMixin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = sparsify.finalize(m)
    assert type(final[0]) is timm_layers.Linear and float((final[0].weight == 0).float().mean()) > 0.3


# --- penalty records ---------------------------------------------------------------------------

def test_copies_and_pickles_start_with_no_penalty_terms():
    """Terms recorded by a training forward belong to its live graph: a deepcopy or a pickle of
    the model made before they were collected holds none (and the deepcopy does not fail)."""
    import copy
    import pickle
    torch.manual_seed(0)
    m = sparsify.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), "tl1",
                          example_inputs=torch.zeros(1, 8))
    m(torch.randn(2, 8))  # a training forward whose penalty is not collected yet
    assert float(sparsify.penalty(pickle.loads(pickle.dumps(m)))) == 0.0
    assert float(sparsify.penalty(copy.deepcopy(m))) == 0.0
    assert float(sparsify.penalty(m).detach()) > 0  # the model's own terms are still there


# --- Lightning ---------------------------------------------------------------------------------

def _mlp(n_in, n_out):
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out))


def test_lightning_a_wrapped_sparsified_network_is_one_module_to_step():
    """A network sparsified then wrapped (nn.DataParallel) is found once, as the wrapper: the
    callback steps it once per optimizer step, not again through the model inside."""
    pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from sparsify.integrations.lightning import sparsified_modules
    holder = nn.Module()
    holder.net = nn.DataParallel(sparsify.sparsify(_mlp(8, 1), "gmp", total_steps=4, example_inputs=torch.zeros(1, 8)))
    assert sparsified_modules(holder) == [holder.net]


def test_lightning_sparsify_as_saved_passes_its_keywords_to_sparsify():
    """example_inputs given to sparsify_as_saved reach sparsify: a layer the code reads directly
    stays dense, as in the run that wrote the checkpoint, and the checkpoint loads."""
    pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from sparsify.integrations.lightning import sparsify_as_saved
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    trained = nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense layer, said elsewhere
        trained.net = sparsify.sparsify(_MixNet("keyword"), "gmp", total_steps=4, example_inputs=(x,))
        fresh = nn.Module()
        fresh.net = _MixNet("keyword")
        assert sparsify_as_saved(fresh, {"state_dict": trained.state_dict()}, example_inputs=(x,)) == ["net"]
    assert not isinstance(fresh.net.mix.proj, SparseWeightMixin) and isinstance(fresh.net.mix.inp, SparseWeightMixin)
    fresh.load_state_dict(trained.state_dict())


def test_lightning_sparsify_as_saved_refuses_a_checkpoint_of_the_module_itself_sparsified():
    """A checkpoint whose root module was sparsified (not a network inside it) is refused by name."""
    pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from sparsify.integrations.lightning import sparsify_as_saved
    saved = sparsify.sparsify(_mlp(8, 1), "gmp", total_steps=4, example_inputs=torch.zeros(1, 8)).state_dict()
    with pytest.raises(TypeError, match="holds Sequential itself sparsified; sparsify the network it holds"):
        sparsify_as_saved(_mlp(8, 1), {"state_dict": saved})
