"""DistributedDataParallel on 2 CPU processes (gloo): every built-in recipe trains, the sparsify
state is identical across ranks, and the result equals a single-process run on the same global
batch (tolerance: losses and weights within 1e-5 relative; see docs/distributed.md)."""
from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsify

from loops import rank_state, train
from spawned import spawn
from sparsify.integrations.distributed import assert_synchronized, state_fingerprint
from sparsify.core.state import find_state

WORLD = 2
STEPS = 3
TOTAL = 4  # schedules ramp within the run: thresholds, masks and score maps all move
LOCAL_BATCH = 4


def tiny_cnn():
    # no BatchNorm: per-rank batch statistics would differ from the global batch's (use
    # SyncBatchNorm for that); everything else is exercised: convs, a Linear, ReLUs
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * LOCAL_BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (WORLD * LOCAL_BATCH,), generator=g))
            for _ in range(STEPS)]




def build(recipe):
    return sparsify.sparsify(tiny_cnn(), recipe, total_steps=TOTAL, example_inputs=torch.zeros(1, 3, 16, 16))


def _worker(rank, port, outdir, recipes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {}
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for recipe in recipes:
            model = build(recipe)
            if rank:  # a rank whose random draws differ: methods must take rank 0's (broadcast)
                for group in find_state(model).groups.values():
                    if isinstance(getattr(group, "generator", None), torch.Generator):
                        group.generator.manual_seed(1000 + rank)
            ddp = nn.parallel.DistributedDataParallel(model)
            losses = train(ddp, [(x[sl], y[sl]) for x, y in batches()])
            assert_synchronized(ddp)  # raises on every rank when the states differ
            # per-rank losses are local means: average them into the global-batch loss
            t = torch.tensor(losses, dtype=torch.float64)
            dist.all_reduce(t)
            state, extra = rank_state(ddp.module.state_dict())
            out[recipe] = {"losses": (t / WORLD).tolist(), "fingerprint": state_fingerprint(ddp),
                           "state": {k: v.clone() for k, v in state.items()}, "extra": extra}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # the models (cyclic garbage) and the group they hold go while Python is alive
        dist.destroy_process_group()



RECIPES = sorted(sparsify.builtin_recipes())
#: penalties that are not a sum over samples: Hoyer-square is (sum |x|)^2 / sum x^2 over the whole
#: batch's map, so each rank's half-batch penalty differs from the global batch's (docs/distributed.md)
BATCH_COUPLED = {"activation-hoyer"}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(_worker, str(out), RECIPES, nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_ranks_agree_and_match_single_process(ddp_results, recipe):
    r0, r1 = ddp_results[0][recipe], ddp_results[1][recipe]
    assert r0["fingerprint"] == r1["fingerprint"]
    for k, v in r0["state"].items():  # bitwise: masks, thresholds, score maps, weights
        assert torch.equal(v, r1["state"][k]), k
    assert r0["extra"] == r1["extra"]  # the recipe, stage flags, held layers
    if recipe in BATCH_COUPLED:
        return
    single = build(recipe)
    losses = train(single, batches())
    assert losses == pytest.approx(r0["losses"], rel=1e-5, abs=1e-6)
    ref, ref_extra = rank_state(single.state_dict())
    assert ref_extra == r0["extra"]
    assert ref.keys() == r0["state"].keys()
    for k, v in r0["state"].items():
        if v.dtype == torch.bool:  # a mask may flip only where a weight sits on the threshold
            assert (v != ref[k]).float().mean() <= 0.01, k
        elif v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, ref[k]), k
    assert int(r0["state"]["sparsify_state.step"]) == STEPS


def test_semi_structured_maps_come_from_rank0(ddp_results):
    """The random score maps are drawn and broadcast by rank 0: equal on both ranks although
    rank 1's generator was reseeded (see _worker), and non-trivial."""
    key = next(k for k in ddp_results[0]["semi-structured"]["state"] if k.endswith(".scores"))
    maps = [r["semi-structured"]["state"][key] for r in ddp_results]
    assert maps[0].numel() and maps[0].std() > 0 and torch.equal(maps[0], maps[1])


def test_a_step_under_a_process_group_collects_garbage_at_exit(monkeypatch):
    # a dropped sparsified model is cyclic garbage; left to interpreter teardown, the process group
    # it refers to takes gloo's threads down with it (SIGABRT): sparsify.step registers, once, a
    # gc.collect at exit, while Python is still whole
    import sparsify.core.sharded as sharded
    registered = []
    monkeypatch.setattr(sharded, "_COLLECTING_AT_EXIT", False)
    monkeypatch.setattr(sharded.atexit, "register", registered.append)
    m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "gmp", total_steps=4)
    sparsify.step(m)
    assert registered == []  # no process group: nothing to do
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sparsify.step(m)
        sparsify.step(m)
    finally:
        dist.destroy_process_group()
    assert registered == [gc.collect]


def _missed_step_worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        model = sparsify.sparsify(net, "gmp", total_steps=8, begin=0, end=4, frequency=1)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        gaps, said = [], []
        for i in range(4):
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            out = ddp(x)  # DDP broadcasts rank 0's buffers (masks included) first
            outs = [torch.zeros_like(out) for _ in range(WORLD)]
            dist.all_gather(outs, out.detach())
            gaps.append(float((outs[0] - outs[1]).abs().max()))
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
            opt.zero_grad()
            if not (rank == 1 and i == 1):  # rank 1 misses one sparsify.step
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    sparsify.step(ddp)
                said += [str(w.message) for w in caught if "this rank's step counter" in str(w.message)]
        torch.save({"gaps": gaps, "said": said}, os.path.join(outdir, f"gaps{rank}.pt"))
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_a_rank_that_missed_a_step_computes_with_the_masks_ddp_broadcast(tmp_path):
    """DDP writes rank 0's buffers into rank 1's masks without bumping their version counters: a
    rank that missed one sparsify.step kept its float copy of the old mask, and its next forward
    differed from rank 0's by 0.24 while the parameters and buffers were equal (assert_synchronized
    passed). A second training forward without a step between drops the layer's caches; and the rank
    is told at its next step that its counter came from rank 0 (nothing was said)."""
    spawn(_missed_step_worker, str(tmp_path), nprocs=WORLD)
    rank0, rank1 = (torch.load(tmp_path / f"gaps{r}.pt") for r in range(WORLD))
    assert rank1["gaps"] == [0.0, 0.0, 0.0, 0.0]
    # and the rank that missed it is told, at its next step (nothing was said before)
    assert rank0["said"] == [] and rank1["said"] == [
        "sparsify.step: this rank's step counter is 2, but its last sparsify.step left it at 1: DDP's broadcast "
        "gave it rank 0's, so this rank called sparsify.step fewer (or more) times than rank 0; call it on every "
        "rank after every optimizer step (docs/distributed.md)"]
