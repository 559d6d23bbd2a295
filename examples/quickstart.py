"""Quickstart: the README snippet, runnable as is (ResNet-18 on random 32x32 images, 12 steps).

    python examples/quickstart.py

Swap the random batches for your DataLoader; everything else stays.
"""
import torch
import torch.nn.functional as F
import torchvision

import sparsify

steps = 12
torch.manual_seed(0)
# total_steps: the recipe's schedule (begin/end/fix) is given as fractions of the run
model = sparsify.sparsify(torchvision.models.resnet18(num_classes=10), "st3", total_steps=steps,
                          example_inputs=torch.zeros(1, 3, 32, 32))
opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=1e-4), lr=0.05, momentum=0.9)
for step in range(steps):
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))  # your data here
    loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)  # activation regularizers; 0.0 if none
    opt.zero_grad()
    loss.backward()
    opt.step()
    sparsify.step(model)  # advance schedules, recompute thresholds/masks

print(sparsify.report(model))  # per-layer table; .to_dict() / .to_json() for machines
deployable = sparsify.finalize(model)  # plain torch modules, masks folded in, checked numerically
zeros = sum(int((m.weight == 0).sum()) for m in deployable.modules() if isinstance(m, torch.nn.Conv2d))
print(f"finalized: {type(deployable).__name__}, {zeros:,} zero conv weights")
