"""Per-rank memory of sparsify's own state under FSDP2, against the rank's parameter shards.

    python benchmarks/fsdp_memory.py                       # resnet18, 2 gloo CPU processes
    python benchmarks/fsdp_memory.py --wrap ddp            # the same under DDP (unsharded)
    python benchmarks/fsdp_memory.py --recipes st3 gmp --steps 4 --json out.json
    python benchmarks/fsdp_memory.py --time 7           # and the time cost of recomputing in backward

Builds ResNet-18 (``weights=None``, 10 classes) sparsified with each weight recipe (and dense),
shards it as docs/distributed.md shows (``fully_shard`` on each of ``fsdp_units(model)``, then on
the model), trains a few SGD steps with ``sparsify.step`` after each, then counts on every rank
the bytes of the tensors alive between steps (storages told apart by data pointer):

* ``params``: this rank's parameter shards (``DTensor.to_local()``), the reference of the ratios;
* ``masks``: the sparse layers' bool masks (registered buffers, not sharded by FSDP2);
* ``other_buffers``: sparsify's other registered buffers (thresholds, scales, flags, step);
* ``layer_buffers``: what :mod:`sparsify.core.buffers` keeps per layer (scratch tensors, cached
  effective weights and float masks, per-layer step state);
* ``group_tensors``: tensors the method groups keep in plain attributes (not registered);
* ``workspaces``: the thread's shared workspaces (sized to the largest request, not per layer).

Printed as ratios to ``params``; with N ranks the parameter shards shrink as 1/N while the
sparsify state is per full weight, so the ratios grow with N. ``graph`` is not held between
steps but from each forward to its backward: the bytes autograd saved in the last forward beyond
the dense model's, parameters, registered buffers and the tensors counted above left out (FSDP2
frees the gathered weights itself; the effective weights are recomputed in backward,
:mod:`sparsify.core.recompute`, and ``--time`` gives what that costs).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsify  # noqa: E402
from _report import write_json  # noqa: E402
from sparsify.core import recompute  # noqa: E402
from sparsify.core.buffers import layer_buffers, workspace_bytes  # noqa: E402
from sparsify.core.layers import SparseWeightMixin  # noqa: E402
from sparsify.core.sharded import is_sharded  # noqa: E402
from sparsify.core.state import find_state  # noqa: E402
from sparsify.integrations.distributed import fsdp_units  # noqa: E402

RECIPES = ["dense", "st3", "st3-sigma", "gmp", "nm-2-4", "str", "dual"]
KINDS = ["masks", "other_buffers", "layer_buffers", "group_tensors", "workspaces"]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = (t.to_local() if is_sharded(t) else t).untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj, out: list, depth: int = 0) -> None:
    """Tensors reachable from a group's plain attributes (dicts, lists, small objects)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            _walk(v, out, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple, set)):
        for v in obj:
            _walk(v, out, depth + 1)
    elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        _walk(vars(obj), out, depth + 1)


def sparsify_state_bytes(model: torch.nn.Module) -> tuple[dict[str, int], set[int]]:
    """Bytes per kind (see the module docstring) of what ``model`` and sparsify hold on this rank,
    and the data pointers of those storages."""
    seen: set[int] = set()

    def add(kind: str, tensors) -> None:
        for t in tensors:
            ptr, nbytes = _storage(t)
            if ptr not in seen and nbytes:
                seen.add(ptr)
                out[kind] += nbytes

    out = dict.fromkeys(["params", *KINDS], 0)
    add("params", model.parameters())
    layers = [m for m in model.modules() if isinstance(m, SparseWeightMixin)]
    state = find_state(model) if any(True for _ in layers) else None
    add("masks", [b for m in layers for n, b in m.named_buffers(recurse=False) if n == "mask"])
    owners = layers + ([state] if state is not None else [])
    add("other_buffers", [b for m in owners for b in m.buffers()])
    add("layer_buffers", [t for m in model.modules() if (lb := layer_buffers(m, create=False)) for t in lb.held()])
    if state is not None:
        plain = []
        for g in state.groups.values():
            # registered parameters and buffers are counted above; modules are skipped by _walk
            _walk({k: v for k, v in vars(g).items() if k not in ("_parameters", "_buffers")}, plain)
        add("group_tensors", plain)
    out["workspaces"] = workspace_bytes()
    return out, seen


def build(recipe: str, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    if recipe == "dense":
        return model
    return sparsify.sparsify(model, recipe, total_steps=steps + 1, example_inputs=torch.zeros(1, 3, 32, 32))


def measure(recipe: str, steps: int, rank: int, wrap: str) -> dict:
    from torch.distributed.fsdp import fully_shard
    model = build(recipe, steps)
    weights = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                  for n, p in m.named_parameters(recurse=False) if n == "weight")
    call = model
    if wrap == "ddp":
        call = torch.nn.parallel.DistributedDataParallel(model)
    else:
        if recipe != "dense":
            for unit in fsdp_units(model):
                fully_shard(unit)
        fully_shard(model)
    params = model.parameters() if recipe == "dense" else sparsify.param_groups(model, weight_decay=5e-4)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    saved: dict[int, int] = {}
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        saved.clear()
        with _saved_by_autograd(model, saved):
            loss = F.cross_entropy(call(x), y)
        if recipe != "dense":
            loss = loss + sparsify.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if recipe != "dense":
            sparsify.step(model, loss)
    out, held = sparsify_state_bytes(model)
    # saved by the last forward and not held between steps anyway (a kept buffer counts once)
    out["weights"], out["saved"] = weights, sum(b for p, b in saved.items() if p not in held)
    return out


def time_recompute(recipe: str, rank: int, rounds: int, batch: int) -> dict:
    """Seconds per training step under FSDP2 with the effective weights recomputed in backward
    (sparsify.core.recompute) and with them saved from the forward, alternating the two in
    ``rounds`` rounds of 3 steps on one model; the medians and their ratio."""
    from torch.distributed.fsdp import fully_shard
    model = build(recipe, 1000)
    for unit in fsdp_units(model):
        fully_shard(unit)
    fully_shard(model)
    opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=5e-4), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(rounds + 1):
            for on in (True, False) if r % 2 else (False, True):
                recompute.ENABLED = on
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(3):
                    loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sparsify.step(model)
                if r:  # round 0 warms up
                    times[on].append((time.perf_counter() - t0) / 3)
    finally:
        recompute.ENABLED = True
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"recomputed_s": on, "saved_s": off, "ratio": on / off}


def _saved_by_autograd(model: torch.nn.Module, into: dict[int, int]):
    """Record the storages autograd saves for backward, parameters and buffers left out."""
    own = {b.untyped_storage().data_ptr() for b in model.buffers()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and not is_sharded(t):
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                into[s.data_ptr()] = s.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _worker(rank: int, world: int, port: int, recipes: list[str], steps: int, wrap: str, outdir: str,
            time_rounds: int = 0, batch: int = 32) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = {r: measure(r, steps, rank, wrap) for r in recipes}
        if time_rounds and wrap == "fsdp":
            for r in recipes:
                if r != "dense":
                    rows[r]["time"] = time_recompute(r, rank, time_rounds, batch)
        torch.save(rows, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--wrap", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                    help="also time training steps with the effective weights recomputed in backward against "
                         "saved from the forward (FSDP2; ROUNDS alternating rounds of 3 steps)")
    ap.add_argument("--batch", type=int, default=32, help="batch per rank of the timed steps (32x32 images)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(args.world, _free_port(), args.recipes, args.steps, args.wrap, d, args.time,
                                args.batch), nprocs=args.world, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(args.world)]
    print(f"resnet18, {args.wrap}, {args.world} ranks (gloo, CPU), {args.steps} steps, torch {torch.__version__}; "
          "bytes held between steps, as a ratio to the rank's parameters")
    print(f"{'recipe':10s} {'rank':>4s} {'params MB':>9s} " + " ".join(f"{k:>13s}" for k in KINDS)
          + f" {'sparsify':>9s} {'B/weight':>8s} {'graph':>7s}")
    for recipe in args.recipes:
        for rank, rows in enumerate(ranks):
            r = rows[recipe]
            total = sum(r[k] for k in KINDS)
            r["sparsify_total"] = total
            graph = (r["saved"] - rows["dense"]["saved"]) / r["params"] if "dense" in rows else float("nan")
            print(f"{recipe:10s} {rank:4d} {r['params'] / 2 ** 20:9.2f} "
                  + " ".join(f"{r[k] / r['params']:13.3f}" for k in KINDS)
                  + f" {total / r['params']:9.3f} {total / r['weights']:8.2f} {graph:7.3f}")
    if args.time:
        print(f"\nstep time, recomputed / saved effective weights (rank 0; batch {args.batch} per rank, median of "
              f"{args.time} rounds):")
        for recipe in args.recipes:
            t = ranks[0][recipe].get("time")
            if t:
                print(f"{recipe:10s} {t['recomputed_s'] * 1e3:8.1f} ms {t['saved_s'] * 1e3:8.1f} ms  {t['ratio']:.3f}")
    write_json(args.json, {"wrap": args.wrap, "world": args.world, "steps": args.steps, "torch": torch.__version__,
                           "ranks": ranks})


if __name__ == "__main__":
    main()
