"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on 2 CPU processes (gloo): every weight method
and tl1 trains with its parameters sharded, thresholds and masks are identical across ranks, and
the run equals DDP's on the same data split (tolerance in docs/distributed.md). One spawn runs
every recipe, DDP and FSDP2 in turn."""
from __future__ import annotations

import math
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn

import sparsify

from loops import rank_state, train
from spawned import spawn
from sparsify.core.buffers import layer_buffers, workspace_bytes
from sparsify.core.layers import SparseWeightMixin
from sparsify.core.sharded import is_sharded
from sparsify.core.state import find_state
from sparsify.integrations.distributed import assert_synchronized, fsdp_units, state_fingerprint

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

WORLD = 2
STEPS = 3
TOTAL = 4  # schedules ramp within the run: thresholds and masks move at every step
LOCAL_BATCH = 4
# the weight methods, tl1, and the activation methods that also run under FSDP2
RECIPES = ["st3", "st3-sigma", "gmp", "str", "str-global", "nm-2-4", "dual", "tl1", "semi-structured", "sas"]


def tiny_cnn():
    # no BatchNorm (per-rank batch statistics differ from the global batch's, under both wrappers);
    # FSDP2 shards every weight and bias along dim 0 (STR's 1-element thresholds: all on rank 0)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def batches(rank):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * LOCAL_BATCH, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (WORLD * LOCAL_BATCH,), generator=g)
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        out.append((x[sl], y[sl]))
    return out


def build(recipe, rank):
    model = sparsify.sparsify(tiny_cnn(), recipe, total_steps=TOTAL, example_inputs=torch.zeros(1, 3, 16, 16))
    if rank:  # a rank whose random draws differ: methods must take rank 0's (broadcast)
        for group in find_state(model).groups.values():
            if isinstance(getattr(group, "generator", None), torch.Generator):
                group.generator.manual_seed(1000 + rank)
    return model


def full_state(model) -> dict:
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().clone() for k, v in rank_state(model.state_dict())[0].items()}


PROBE = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)


def held_bytes(model) -> dict:
    """What sparsify keeps on this rank between steps: its masks, the tensors it keeps per layer
    for reuse (:mod:`sparsify.core.buffers`) and in the thread's workspaces, and any floating-point
    buffer of a layer's full weight shape; and the number of weights of the sparse layers."""
    layers = [m for m in model.modules() if isinstance(m, SparseWeightMixin)]
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for m in layers if (b := layer_buffers(m, create=False)) for t in b.held()}
    full_float = [b for m in layers for b in m.buffers(recurse=False)
                  if b.is_floating_point() and b.shape == m.weight.shape]  # a DTensor's shape: the full one
    return {"masks": sum(b.numel() * b.element_size() for m in layers
                         for n, b in m.named_buffers(recurse=False) if n == "mask"),
            "weights": sum(m.weight.numel() for m in layers),
            "kept": sum(kept.values()) + workspace_bytes(),
            "full_float_buffers": sum(b.numel() * b.element_size() for b in full_float)}


def run(wrapped, model, rank) -> dict:
    losses = train(wrapped, batches(rank))
    held = held_bytes(model)  # right after the last sparsify.step
    assert_synchronized(wrapped)  # raises on every rank when the states differ
    t = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(t)  # per-rank losses are local means: their average is the global batch's
    return {"losses": (t / WORLD).tolist(), "fingerprint": state_fingerprint(wrapped), "state": full_state(model),
            "extra": rank_state(model.state_dict())[1], "report": sparsify.report(wrapped).totals, "held": held}


def finalized_output(model) -> torch.Tensor:
    return sparsify.finalize(model).eval()(PROBE).detach()


def fsdp_finalized_output(model, recipe, rank) -> tuple[str, torch.Tensor | None]:
    """finalize refuses the sharded model; the documented way round it: the full state dict,
    loaded on rank 0 into a fresh sparsified model, finalized there."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    try:
        sparsify.finalize(model)
        error = ""
    except RuntimeError as e:
        error = str(e)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank:
        return error, None
    fresh = build(recipe, rank)
    fresh.load_state_dict(full)
    return error, finalized_output(fresh)


def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {}
        for recipe in RECIPES:
            model = build(recipe, rank)
            ddp = run(nn.parallel.DistributedDataParallel(model), model, rank)
            ddp["final"] = finalized_output(model)
            model = build(recipe, rank)
            # the usual FSDP2 wrapping: each layer its own unit, then the root (which holds the rest,
            # e.g. the global STR threshold in sparsify_state)
            for m in list(model.modules()):
                if isinstance(m, SparseWeightMixin):
                    fsdp.fully_shard(m)
            fsdp.fully_shard(model)
            sharded = sorted(n for n, p in model.named_parameters() if is_sharded(p))
            res = run(model, model, rank)
            res["error"], res["final"] = fsdp_finalized_output(model, recipe, rank)
            out[recipe] = {"ddp": ddp, "fsdp": res, "sharded": sharded}
        out["resnet18"] = resnet_runs(rank)
        out["meta"] = meta_runs(rank)
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # the models (cyclic garbage) and the group they hold go while Python is alive
        dist.destroy_process_group()


def resnet(rank):
    torch.manual_seed(0)
    return sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "st3", total_steps=TOTAL,
                             example_inputs=torch.zeros(1, 3, 16, 16))


def resnet_runs(rank) -> dict:
    """ResNet-18 (BatchNorm, residual blocks) sharded by sparsify's fsdp_units, against DDP; and
    the usual per-block wrapping, whose block forward the sparsified graph never calls."""
    model = resnet(rank)
    out = {"ddp": run(nn.parallel.DistributedDataParallel(model), model, rank)}
    model = resnet(rank)
    units = fsdp_units(model)
    for unit in units:
        fsdp.fully_shard(unit)
    fsdp.fully_shard(model)
    out["fsdp"], out["units"] = run(model, model, rank), len(units)
    model = resnet(rank)
    fsdp.fully_shard(model.layer1[0])
    fsdp.fully_shard(model)
    try:
        model(torch.zeros(2, 3, 16, 16))
        out["error"] = ""
    except RuntimeError as e:
        out["error"] = str(e)
    return out


# recipes that build on meta (ST-3 and N:M read weight values at sparsify time and refuse it)
META_RECIPES = ["gmp", "str", "dual", "tl1", "semi-structured"]


def meta_runs(rank) -> dict:
    """docs/distributed.md's meta-device flow: sparsify on meta, shard, ``to_empty``, then the full
    state dict of a trained sparsified model (the same on every rank) through torch's
    ``set_model_state_dict``; the eval output against that model's, and one more step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    out = {}
    for recipe in META_RECIPES:
        source = build(recipe, 0)
        train(source, batches(0))
        with torch.device("meta"):
            net = tiny_cnn()
        model = sparsify.sparsify(net, recipe, total_steps=TOTAL, example_inputs=torch.zeros(1, 3, 16, 16, device="meta"))
        for m in list(model.modules()):
            if isinstance(m, SparseWeightMixin):
                fsdp.fully_shard(m)
        fsdp.fully_shard(model)
        model.to_empty(device="cpu")
        set_model_state_dict(model, source.state_dict(), options=StateDictOptions(full_state_dict=True))
        source.eval(), model.eval()
        with torch.no_grad():
            diff = float((model(PROBE) - source(PROBE)).abs().max())
        model.train()
        losses = train(model, batches(rank)[:1])
        out[recipe] = {"diff": diff, "step": int(find_state(model).step), "loss": losses[0]}
    return out



@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, str(out), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp2_ranks_agree_and_match_ddp(results, recipe):
    r0, r1 = results[0][recipe], results[1][recipe]
    # the parameters really were sharded: every weight of every layer
    assert {f"{i}.weight" for i in (0, 2, 4, 8)} <= set(r0["sharded"])
    f0, f1 = r0["fsdp"], r1["fsdp"]
    assert f0["fingerprint"] == f1["fingerprint"]
    for k, v in f0["state"].items():  # bitwise across ranks: weights, masks, thresholds, scales, step
        assert torch.equal(v, f1["state"][k]), k
    assert f0["extra"] == f1["extra"] == r0["ddp"]["extra"]
    ddp = r0["ddp"]
    assert f0["losses"] == pytest.approx(ddp["losses"], rel=1e-5, abs=1e-6)
    assert f0["state"].keys() == ddp["state"].keys()
    for k, v in f0["state"].items():
        ref = ddp["state"][k]
        if v.dtype == torch.bool:  # a mask may flip only where a weight sits on the threshold
            assert (v != ref).float().mean() <= 0.01, k
        elif v.is_floating_point():
            torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, ref), k
    assert int(f0["state"]["sparsify_state.step"]) == STEPS
    # sparsify.report on the sharded model reads the gathered weights (a collective)
    assert f0["report"] == f1["report"]
    for key in ("weight_sparsity", "nonzero_params", "nonzero_macs", "params"):
        want = ddp["report"][key]
        assert f0["report"][key] == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), key


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp2_finalize_refuses_sharded_model_and_full_state_dict_finalizes(results, recipe):
    f0 = results[0][recipe]["fsdp"]
    assert f0["error"].startswith("finalize: this model's parameters are sharded (FSDP2's fully_shard)")
    assert "get_model_state_dict" in f0["error"] and results[1][recipe]["fsdp"]["error"] == f0["error"]
    torch.testing.assert_close(f0["final"], results[0][recipe]["ddp"]["final"], rtol=1e-5, atol=1e-6)


def test_fsdp2_prunes(results):
    """Not a vacuous comparison: by the last step the masked methods prune most weights, and
    ST-3's global threshold is positive (computed from the gathered weights)."""
    st = results[0]["st3"]["fsdp"]["state"]
    assert float(st["sparsify_state.groups.rule0_st3.tau"]) > 0
    for recipe in ("st3", "gmp", "nm-2-4"):
        mask = results[0][recipe]["fsdp"]["state"]["4.mask"]
        assert 0.4 <= 1 - mask.float().mean() < 1, recipe



# the recipes whose weight layers keep a bool mask (1 byte per weight)
MASKED = {"st3", "st3-sigma", "gmp", "nm-2-4", "dual"}


@pytest.mark.parametrize("recipe", [*RECIPES, "resnet18"])
def test_fsdp2_keeps_no_weight_sized_float_tensors_between_steps(results, recipe):
    """Under FSDP2 a rank holds only its parameter shards; sparsify adds its masks (1 byte per
    weight) and nothing weight-sized in floating point: no kept effective weights, float masks or
    scores, no workspaces (docs/distributed.md, "Memory under FSDP2")."""
    for r in results:
        held = r[recipe]["fsdp"]["held"]
        assert held["kept"] == 0 and held["full_float_buffers"] == 0, held
        assert held["masks"] == (held["weights"] if recipe in MASKED or recipe == "resnet18" else 0), held
    if recipe in ("st3", "gmp", "nm-2-4", "str"):
        # DDP's replicas keep their reused tensors (the speed path of an unsharded model)
        assert results[0][recipe]["ddp"]["held"]["kept"] > 0


def test_fsdp2_resnet18_units_match_ddp(results):
    """Per-rank BatchNorm statistics are each rank's own under FSDP2 (not broadcast as by DDP),
    so across ranks only the parameters and the sparsify state are compared."""
    r0, r1 = results[0]["resnet18"], results[1]["resnet18"]
    assert r0["units"] == 11  # 8 blocks + 3 downsample pairs
    f0, f1, ddp = r0["fsdp"], r1["fsdp"], r0["ddp"]
    assert f0["fingerprint"] == f1["fingerprint"]
    for k, v in f0["state"].items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, f1["state"][k]), k
    assert f0["losses"] == pytest.approx(ddp["losses"], rel=1e-5, abs=1e-6)
    for k, v in f0["state"].items():  # rank 0: its own BatchNorm statistics under both wrappers
        if v.dtype == torch.bool:
            assert (v != ddp["state"][k]).float().mean() <= 0.01, k
        elif v.is_floating_point():
            torch.testing.assert_close(v, ddp["state"][k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, ddp["state"][k]), k


def test_fsdp2_on_a_block_the_graph_never_calls_is_one_clear_error(results):
    for r in results:
        err = r["resnet18"]["error"]
        assert err.startswith("ST3Conv2d: its weight is still sharded (FSDP2) when it computes"), err
        assert "fsdp_units(model)" in err


@pytest.mark.parametrize("recipe", META_RECIPES)
def test_fsdp2_meta_init_then_a_full_state_dict_gives_the_trained_model(results, recipe):
    for rank in range(WORLD):
        got = results[rank]["meta"][recipe]
        assert got["diff"] < 1e-6, (rank, got)
        assert got["step"] == STEPS + 1 and math.isfinite(got["loss"])
