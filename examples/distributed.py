"""Sparse training under torchrun, with DDP or FSDP2 (docs/distributed.md); ResNet-18 on random
32x32 images, 12 steps.

    torchrun --standalone --nproc_per_node=2 examples/distributed.py --wrap fsdp   # CPU: gloo
    torchrun --standalone --nproc_per_node=8 examples/distributed.py --wrap ddp    # 8 GPUs: nccl

Swap the random batches for a DataLoader with a DistributedSampler; everything else stays.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import sparsify
from sparsify.integrations.distributed import assert_synchronized, fsdp_units

parser = argparse.ArgumentParser()
parser.add_argument("--wrap", choices=["ddp", "fsdp"], default="fsdp")
parser.add_argument("--recipe", default="st3")
parser.add_argument("--steps", type=int, default=12)
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)


def build():
    torch.manual_seed(0)  # every rank builds the same model (FSDP2 broadcasts nothing)
    return sparsify.sparsify(torchvision.models.resnet18(num_classes=10), args.recipe, total_steps=args.steps,
                             example_inputs=torch.zeros(1, 3, 32, 32))


model = build().to(device)
if args.wrap == "ddp":
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
else:
    from torch.distributed.fsdp import fully_shard
    for unit in fsdp_units(model):  # the modules the sparsified graph calls, one list per block
        fully_shard(unit)
    wrapped = fully_shard(model)
opt = torch.optim.SGD(sparsify.param_groups(wrapped, weight_decay=1e-4), lr=0.05, momentum=0.9)

data = torch.Generator().manual_seed(1 + rank)  # each rank its own shard of the data
for step in range(args.steps):
    x, y = torch.randn(8, 3, 32, 32, generator=data), torch.randint(0, 10, (8,), generator=data)
    loss = F.cross_entropy(wrapped(x.to(device)), y.to(device)) + sparsify.penalty(wrapped)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sparsify.step(wrapped, loss)  # on every rank

assert_synchronized(wrapped)  # raises on every rank if thresholds or masks differ
report = sparsify.report(wrapped)  # every rank: under FSDP2 it gathers the weights
if args.wrap == "ddp":
    final = sparsify.finalize(wrapped) if rank == 0 else None
else:  # a sharded model is finalized from its full state dict, on one rank
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = None
    if rank == 0:
        final = build()
        final.load_state_dict(full)
        final = sparsify.finalize(final)
if rank == 0:
    zeros = sum(int((m.weight == 0).sum()) for m in final.modules() if isinstance(m, torch.nn.Conv2d))
    print(f"{args.wrap}, {dist.get_world_size()} processes: weight sparsity "
          f"{report.totals['weight_sparsity']:.3f}; finalized with {zeros:,} zero conv weights")
# free the wrapped model (and the process group its buffers and shards hold) while Python is alive:
# a traced model is freed by the cycle collector, and one left to interpreter exit can take gloo's
# threads down with it (SIGABRT, "terminate called without an active exception")
del model, wrapped, opt, loss, final
gc.collect()
dist.destroy_process_group()
