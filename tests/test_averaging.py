"""Weight averaging (EMA / SWA) of a sparsified model, the way trainers keep one: torch's
``AveragedModel`` (with and without averaged buffers) and timm's ``ModelEmaV2`` / ``ModelEmaV3``
(timm's train script's ``--model-ema``), updated after each step and then ``sparsify.sync``-ed.

The averaged model must compute with the training model's sparsity on its own averaged weights:
with decay 0 it is the training model, entry for entry and output for output; with decay 0.5 its
parameters are the running average and its masks the model's."""
from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import sparsify
from sparsify.core.averaging import sparsity_entries
from sparsify.core.extra_state import WIDEST_FLOAT, pack, unpack
from loops import run_steps

RECIPES = sorted(sparsify.builtin_recipes())
TOOLS = ["averaged-buffers", "averaged", "timm-v2", "timm-v3"]
X = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 2, 3, 4])
STEPS = 8


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))


def sparse(recipe: str) -> nn.Module:
    # STR starts exactly dense at its official s_init; -3 puts its soft threshold in play at once
    kw = {"s_init": -3.0} if recipe.startswith("str") else {}
    return sparsify.sparsify(net(), recipe, total_steps=12, example_inputs=X[:1], **kw)


def averager(tool: str, model: nn.Module, decay: float):
    """The averaged copy and its update function, as each tool's users make them."""
    if tool.startswith("timm"):
        model_ema = pytest.importorskip("timm.utils.model_ema", reason="timm is not installed (the dev extra has it)")
        ema = (model_ema.ModelEmaV2(model, decay=decay) if tool == "timm-v2"
               else model_ema.ModelEmaV3(model, decay=decay))
        return ema, lambda: ema.update(model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=tool == "averaged-buffers")
    ema.update_parameters(model)  # its first update copies; from then on it averages
    return ema, lambda: ema.update_parameters(model)


def train(model, update, steps: int = STEPS, sync_to=None):
    opt = torch.optim.SGD(sparsify.param_groups(model, 5e-3), lr=0.1, momentum=0.9)
    for _ in range(steps):
        model.train()
        loss = F.cross_entropy(model(X), Y) + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsify.step(model, loss)
        yield
        update()
        if sync_to is not None:
            sparsify.sync(sync_to, model)


def as_data(entries: dict) -> dict:
    """State entries as comparable data: tensors, and extra state unpacked, without the flag that
    tells an averaged copy sync updated from the model it copies."""
    out = {}
    for k, v in entries.items():
        if k.endswith("_extra_state"):
            v = {n: x for n, x in unpack(v).items() if n != "synced"}
        out[k] = v
    return out


def state_of(module: nn.Module) -> dict:
    return as_data(module.state_dict())


def assert_same_state(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], torch.Tensor):
            assert torch.equal(got[k], want[k]), f"{what}: {k} differs"
        else:
            assert str(got[k]) == str(want[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_with_decay_0_the_synced_average_is_the_model(recipe, tool):
    model = sparse(recipe)
    ema, update = averager(tool, model, decay=0.0)
    for _ in train(model, update, sync_to=ema):
        pass
    inner = ema.module
    assert_same_state(state_of(inner), state_of(model), f"{recipe} / {tool}")
    model.eval(), inner.eval()
    with torch.no_grad():
        assert torch.equal(inner(X), model(X))
    # report and finalize take the wrapper itself
    assert sparsify.report(ema).totals == sparsify.report(model).totals
    with torch.no_grad():
        assert torch.equal(sparsify.finalize(ema)(X), sparsify.finalize(model)(X))


@pytest.mark.parametrize("tool", ["averaged-buffers", "timm-v2", "timm-v3"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_with_decay_one_half_parameters_average_and_sparsity_follows_the_model(recipe, tool):
    model = sparse(recipe)
    ema, update = averager(tool, model, decay=0.5)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in train(model, update, sync_to=ema):
        for n, p in model.named_parameters():
            expected[n] = 0.5 * expected[n] + 0.5 * p.detach()
    inner = ema.module
    for n, p in inner.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-6, atol=1e-7, msg=f"{recipe}: parameter {n}")
    want, got = as_data(sparsity_entries(model)), as_data(sparsity_entries(inner))
    assert_same_state(got, want, f"{recipe} / {tool}")
    # a masked layer of the averaged model deploys with the model's zeros
    final = sparsify.finalize(ema)
    for name, layer in model.named_modules():
        if isinstance(getattr(layer, "mask", None), torch.Tensor) and layer.mask.dtype == torch.bool:
            assert not final.get_submodule(name).weight[~layer.mask].any(), f"{recipe}: {name} lost its zeros"


@given(recipe=st.sampled_from(RECIPES), tool=st.sampled_from(["averaged-buffers", "averaged", "timm-v2", "timm-v3"]),
       decay=st.floats(0.0, 1.0), steps=st.integers(1, 6))
def test_any_decay_and_run_length_average_the_parameters_and_copy_the_sparsity(recipe, tool, decay, steps):
    if tool.startswith("timm") and importlib.util.find_spec("timm") is None:
        tool = "averaged-buffers"  # the same property through torch's tool where timm is absent
    model = sparse(recipe)
    ema, update = averager(tool, model, decay=decay)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in train(model, update, steps=steps, sync_to=ema):
        for n, p in model.named_parameters():
            expected[n] = torch.lerp(expected[n], p.detach(), 1 - decay)
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6, msg=f"{recipe} / {tool}: {n}")
    assert_same_state(as_data(sparsity_entries(ema.module)), as_data(sparsity_entries(model)), f"{recipe} / {tool}")


def test_without_sync_an_averaged_mask_is_the_union_of_the_masks():
    # why sync exists: averaging a bool mask as a number keeps every weight any mask kept
    model = sparsify.sparsify(net(), "gmp", total_steps=12, example_inputs=X[:1], begin=0, end=6)
    ema, update = averager("averaged-buffers", model, decay=0.9)
    for _ in train(model, update):
        pass
    assert int((~model[0].mask).sum()) > 0
    assert bool(ema.module[0].mask.all())
    sparsify.sync(ema, model)
    assert torch.equal(ema.module[0].mask, model[0].mask)


@pytest.mark.parametrize("recipe", RECIPES)
def test_extra_state_keeps_its_size_over_a_run(recipe):
    # timm's EMAs copy every state_dict entry in place: a size change stops them mid-run
    model = sparse(recipe)
    sizes = {k: v.shape for k, v in model.state_dict().items() if k.endswith("_extra_state")}
    for _ in train(model, lambda: None, steps=12):
        now = {k: v.shape for k, v in model.state_dict().items() if k.endswith("_extra_state")}
        assert now == sizes


@given(l1=st.floats(allow_nan=True, allow_infinity=True), active=st.booleans(),
       held=st.lists(st.sampled_from(["conv1", "layer1.0.conv2", "fc"]), unique=True))
def test_packed_state_has_the_size_of_its_widest_form_and_reads_back(l1, active, held):
    every = ["conv1", "layer1.0.conv2", "fc"]
    for state, like in [({"l1": l1}, {"l1": WIDEST_FLOAT}), ({"active": active}, {"active": False}),
                        ({"held_at_min_density": held}, {"held_at_min_density": every})]:
        packed = pack(state, like=like)
        assert packed.shape == pack(like).shape
        assert str(unpack(packed)) == str(state)


def test_sync_refuses_what_is_not_an_averaged_copy():
    model = sparse("gmp")
    with pytest.raises(ValueError, match="same module"):
        sparsify.sync(model, model)
    with pytest.raises(ValueError, match="another recipe"):
        sparsify.sync(AveragedModel(sparse("st3")), model)
    # made from the dense model before sparsify(): the message says which model to average
    with pytest.raises(TypeError, match=r"averaged \(AveragedModel\) holds no sparsify state: make the averaged "
                                        r"copy from the model sparsify returned"):
        sparsify.sync(AveragedModel(net()), model)
    other = sparsify.sparsify(nn.Sequential(nn.Linear(4, 4)), "gmp", total_steps=12)
    with pytest.raises(ValueError, match="not a copy"):
        sparsify.sync(other, model)
    # the training model second: refused before it could take the averaged masks
    ema, update = averager("averaged-buffers", model, decay=0.9)
    with pytest.raises(ValueError, match="look reversed"):
        sparsify.sync(model, ema)
    for _ in train(model, update):
        pass
    plain = copy.deepcopy(model)
    sparsify.step(model)
    with pytest.raises(ValueError, match=r"look reversed \(the second is at step 8, the first at 9\)"):
        sparsify.sync(model, plain)


def test_sync_works_across_devices_and_copies():
    # a deepcopy averaged by hand, kept in float64 as some EMA setups do
    model = sparse("st3")
    ema = copy.deepcopy(model).double()
    for _ in train(model, lambda: None, steps=4):
        pass
    sparsify.sync(ema, model)
    assert torch.equal(ema[0].mask, model[0].mask)
    assert ema[0].weight.dtype == torch.float64


@pytest.mark.parametrize("recipe", ["dual", "st3", "semi-structured", "nm-2-4", "sas"])
def test_a_torchvision_model_and_its_synced_average_agree_with_decay_0(recipe):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), recipe, total_steps=4, example_inputs=(x,))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.0), use_buffers=True)
    opt = torch.optim.SGD(sparsify.param_groups(model, 1e-4), lr=0.01)
    run_steps(model, opt, [(x, y)] * 3, penalty=True,
              after=lambda: (ema.update_parameters(model), sparsify.sync(ema, model)))
    model.eval(), ema.eval()
    with torch.no_grad():
        assert torch.equal(ema(x), model(x))


@pytest.mark.filterwarnings("ignore:sparsify. torch.fx could not trace")  # BERT's root, under dual: expected, see docs
@pytest.mark.parametrize("recipe", ["dual", "st3"])
def test_a_transformers_model_called_with_labels_and_its_synced_average(recipe):
    pytest.importorskip("transformers", reason="transformers is not installed (the integrations extra has it)")
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    model = sparsify.sparsify(BertForSequenceClassification(cfg), recipe, total_steps=4, example_inputs=(ids,))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.0), use_buffers=True)
    opt = torch.optim.AdamW(sparsify.param_groups(model, 1e-4), lr=1e-3)

    def average():
        ema.update_parameters(model)
        sparsify.sync(ema, model)
    run_steps(model, opt, [(ids, labels)] * 4, penalty=True, after=average,
              loss_of=lambda x, y: model(input_ids=x, labels=y).loss)
    model.eval(), ema.eval()
    with torch.no_grad():
        assert torch.equal(ema(input_ids=ids).logits, model(input_ids=ids).logits)
    assert sparsify.report(ema).totals == sparsify.report(model).totals


@pytest.mark.parametrize("recipe", RECIPES)
def test_swa_with_update_bn_leaves_the_synced_sparsity_alone(recipe):
    # torch's SWA recipe: equal-weight average, then update_bn runs training-mode forwards over data
    model = sparse(recipe)
    swa = AveragedModel(model)
    for _ in train(model, lambda: swa.update_parameters(model), sync_to=swa):
        pass
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in as_data(sparsity_entries(swa.module)).items()}
    torch.optim.swa_utils.update_bn([(X, Y)] * 2, swa)
    after = as_data(sparsity_entries(swa.module))
    assert_same_state(after, before, recipe)
    assert float(sparsify.penalty(swa)) == 0.0  # its no-grad forwards recorded no penalty term


def test_report_and_finalize_of_an_average_never_synced_warn_once():
    model = sparse("gmp")
    ema, update = averager("averaged-buffers", model, decay=0.9)
    for _ in train(model, update):
        pass
    with pytest.warns(UserWarning, match=r"never given the training model's sparsity.*sparsify.sync"):
        sparsify.report(ema)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model
        sparsify.report(ema)
        sparsify.sync(ema, model)
        sparsify.finalize(ema)
    # the synced flag travels with the average's state_dict: a reloaded EMA does not warn
    again, _ = averager("averaged-buffers", sparse("gmp"), decay=0.9)
    again.load_state_dict(ema.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify.report(again)


def test_the_sync_benchmark_writes_a_row_per_recipe(tmp_path, monkeypatch):
    import importlib.util as iu
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ema_sync.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its helpers (_timing, _report), as when run as a script
    spec = iu.spec_from_file_location("ema_sync", path)
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    bench.main(["--model", "resnet18", "--recipes", "gmp,dual", "--rounds", "1", "--batch", "2", "--size", "32",
                "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["recipe"] for r in rows] == ["gmp", "dual"]
    assert all(r["sync_ms"] > 0 and r["update_ms"] > 0 and r["train_step_ms"] > 0 for r in rows)


def test_a_subclass_of_averaged_model_is_taken_as_a_wrapper():
    # torchvision's reference training scripts keep their EMA as such a subclass
    class ExponentialMovingAverage(AveragedModel):
        def __init__(self, model, decay):
            super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    model = sparse("gmp")
    ema = ExponentialMovingAverage(model, 0.0)
    for _ in train(model, lambda: ema.update_parameters(model), sync_to=ema):
        pass
    assert sparsify.report(ema).totals == sparsify.report(model).totals


@pytest.mark.parametrize("recipe", ["st3", "st3-sigma"])
def test_st3s_fix_bakes_the_averaged_weights_as_it_bakes_the_models(recipe):
    # the fix writes W <- W_eff into the model; a frozen average (decay 1) of a model that does not
    # learn (lr 0) holds the pre-fix latent weights and must come out of the fix equal to the model
    model = sparsify.sparsify(net(), recipe, total_steps=6, example_inputs=X[:1], begin=0, end=2, fix=3)
    # (use_buffers=False: BatchNorm statistics copied, parameters averaged)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1.0), use_buffers=False)
    ema.update_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run_steps(model, opt, [(X, Y)] * 5, penalty=True, after=lambda: (ema.update_parameters(model),
                                                                      sparsify.sync(ema, model)))
    assert bool(model[0].fixed)
    for (name, p), (_, q) in zip(ema.module.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    model.eval(), ema.eval()
    with torch.no_grad():
        torch.testing.assert_close(ema(X), model(X), rtol=1e-5, atol=1e-6)


def test_an_average_lagging_st3s_schedule_is_warned_once():
    # the CLI's --ema 0.99 with st3 on digits: the model at 0.99 test accuracy, its average at 0.10, no word.
    # Before the fix, the copy computes c·(W − sign(W)·τ) ⊙ M with the model's τ and M on averaged weights:
    # a kept weight whose average lies at or below τ comes out with the opposite sign
    def run(decay):
        model = sparsify.sparsify(net(), "st3", total_steps=12, example_inputs=X[:1], begin=0, end=0.5, fix=0.9)
        ema, update = averager("averaged", model, decay=decay)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in train(model, update, sync_to=ema):
                pass
        return [str(w.message) for w in caught if "sparsify.sync: at step" in str(w.message)]
    lagging = run(0.999)
    assert len(lagging) == 1 and "turns their sign" in lagging[0] and "smaller decay" in lagging[0]
    assert run(0.0) == []  # the copy is the model: nothing lags


def test_sync_carries_the_sparsity_of_a_method_written_outside_the_library(monkeypatch):
    """A user's method: its layer class (made with specialize) and its group live in the user's
    module, and sync copied nothing of theirs; the EMA copy kept the union of the masks (dense)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from sparsify.core.contract import Group, Method
    from sparsify.core.layers import SparseWeightMixin, specialize
    from sparsify.core.registry import REGISTRY

    class MaskMixin(SparseWeightMixin):
        def init_sparse(self, **params):
            self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))

        def effective_weight(self):
            return self.weight * self.mask
    masked = specialize(MaskMixin, prefix="UserMasked")

    class Half(Group):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("pruned_at", torch.tensor(-1))

        def writes_weights(self, step):
            return False

        @torch.no_grad()
        def update(self, step, loss=None):
            if step == 2:
                self.pruned_at.fill_(step)
                for m in self.members.values():
                    m.mask.copy_(m.weight.abs() > m.weight.abs().median())

    class HalfMethod(Method):
        name, group_class = "half-test", Half

        def apply(self, site, params):
            site.replace(masked[type(site.module)].from_dense(site.module))
    monkeypatch.setitem(REGISTRY, HalfMethod.name, HalfMethod())
    torch.manual_seed(0)
    model = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(16, 16)),
                              {"version": 1, "rules": [{"match": {"type": "Linear"}, "method": HalfMethod.name}]})
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        sparsify.step(model)
        ema.update_parameters(model)
        sparsify.sync(ema, model)
    assert torch.equal(ema.module[0].mask, model[0].mask) and float(model[0].mask.float().mean()) == 0.5
    group = next(iter(ema.module.sparsify_state.groups.values()))
    assert int(group.pruned_at) == 2
