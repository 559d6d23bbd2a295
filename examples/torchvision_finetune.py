"""Sparse fine-tuning of a torchvision model on your own images, with your own loop.

    python examples/torchvision_finetune.py --data /path/to/images --model mobilenet_v3_small --recipe st3
    python examples/torchvision_finetune.py            # no --data: makes a tiny synthetic folder first

``--data`` is an ImageFolder root (one sub-folder per class). The loop is plain PyTorch: the library
only adds ``sparsify.penalty`` to the loss, ``sparsify.step`` after ``optimizer.step()`` and its own
parameter groups. Checkpoints are ordinary ``state_dict``s: the sparsify state (step, thresholds,
masks) lives in buffers, so reloading into ``sparsify.sparsify(<same model>, <same recipe>,
total_steps=<same>)`` resumes exactly.
"""
import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import sparsify


def synthetic_folder(root: str, classes=("a", "b"), per_class=16, size=48) -> str:
    """Random PNGs in ``root/<class>/``: lets the example run without a dataset."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            img = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(img).save(os.path.join(root, c, f"{i}.png"))
    return root


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", help="ImageFolder root (default: a synthetic one)")
    p.add_argument("--model", default="mobilenet_v3_small")
    p.add_argument("--recipe", default="st3")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "sparsify-finetune"))
    args = p.parse_args()
    data_root = args.data or synthetic_folder(os.path.join(tempfile.mkdtemp(), "images"))

    tf = transforms.Compose([transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    train_set = datasets.ImageFolder(data_root, transform=tf)
    loader = DataLoader(train_set, batch_size=8, shuffle=True)
    total_steps = args.epochs * len(loader)

    torch.manual_seed(0)
    # weights=None: nothing is downloaded; load your pretrained state_dict here to fine-tune
    base = torchvision.models.get_model(args.model, weights=None, num_classes=len(train_set.classes))
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    print(sparsify.plan(base, args.recipe, example_inputs=example))  # dry run: what will be rewritten
    model = sparsify.sparsify(base, args.recipe, total_steps=total_steps, example_inputs=example)
    opt = torch.optim.SGD(sparsify.param_groups(model, weight_decay=1e-4), lr=0.01, momentum=0.9)

    os.makedirs(args.out, exist_ok=True)
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + sparsify.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(model, loss=loss)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(args.out, "ckpt.pt"))
        print(f"epoch {epoch + 1}: loss {float(loss):.3f}, "
              f"weight sparsity {sparsify.report(model).totals['weight_sparsity'] or 0:.3f}")

    print(sparsify.report(model))
    final = sparsify.finalize(model)
    torch.save(final.state_dict(), os.path.join(args.out, "final.pt"))
    print(f"finalized model saved to {args.out}/final.pt")


if __name__ == "__main__":
    main()
