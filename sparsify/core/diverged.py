"""Whether training diverged: parameters holding NaN or inf.

Every method computes from the weights; once one is NaN, masks, thresholds and the report mean
nothing, and a method that does not threshold (N:M, SAS, the regularizers) would train on
silently. ``sparsify.step`` looks at a few steps only (:func:`check_due`): the look costs a pass
over the parameters and one device sync, and a diverged run stays diverged.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

__all__ = ["check_due", "local_values", "nonfinite_parameters", "diverged_message", "refuse_nonfinite"]


def check_due(step: int, total_steps: int | None) -> bool:
    """Steps 1, 2, 4, 8, ..., every 100th and the last.

    >>> [t for t in range(1, 300) if check_due(t, 250)]
    [1, 2, 4, 8, 16, 32, 64, 100, 128, 200, 250, 256]
    """
    return step > 0 and (step & (step - 1) == 0 or step % 100 == 0 or step == total_steps)


def local_values(p: torch.Tensor) -> torch.Tensor | None:
    """This process's values of ``p``: itself, the local shard of a DTensor (FSDP2), or None on
    the meta device (no values)."""
    if p.device.type == "meta":
        return None
    to_local = getattr(p, "to_local", None)  # a DTensor shard (FSDP2): this rank's part
    return to_local() if callable(to_local) else p


@torch.no_grad()
def nonfinite_parameters(root: nn.Module) -> list[str]:
    """Names of the parameters of ``root`` holding a NaN or an infinity.

    >>> net = nn.Linear(2, 2)
    >>> nonfinite_parameters(net)
    []
    >>> _ = net.bias.data.fill_(float("nan")); nonfinite_parameters(net)
    ['bias']
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, p in root.named_parameters():
        local = local_values(p.detach())
        if local is not None and local.numel() and local.is_floating_point():
            by_device[local.device].append((name, local))
    bad = []
    for params in by_device.values():
        # a finite float32 sum proves every value finite (NaN and inf reach it): one sync per device
        sums = torch.stack([t.sum(dtype=torch.float32) for _, t in params])
        if bool(torch.isfinite(sums).all()):
            continue
        for name, t in params:  # a non-finite sum may be an overflow: look at the values
            if not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def _first(bad: list[str]) -> str:
    """The first three names of ``bad``, and `` ...`` when there are more."""
    return ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")


def diverged_message(where: str, bad: list[str], step: int | None = None) -> str:
    """The one-line warning or error for parameters ``bad`` found non-finite.

    >>> diverged_message("sparsify.step", ["fc.weight"], 8)[:78]
    'sparsify.step: NaN or inf in 1 parameter(s) at step 8 (fc.weight): training di'
    """
    at = f" at step {step}" if step is not None else ""
    return (f"{where}: NaN or inf in {len(bad)} parameter(s){at} ({_first(bad)}): training diverged, and the masks, "
            "thresholds and sparsity computed from these weights mean nothing; lower the learning rate or clip "
            "gradients (pass loss= to sparsify.step to be told at the first non-finite loss)")


def refuse_nonfinite(model: nn.Module) -> None:
    """Refuse a model that holds NaN or inf before ``sparsify`` rewrites it: no training made that
    (its initialisation or the checkpoint loaded did), and every mask and threshold would be
    computed from it; a ``ValueError`` naming the parameters.

    >>> net = nn.Sequential(nn.Linear(2, 2)); _ = net[0].weight.data.fill_(float("inf"))
    >>> refuse_nonfinite(net)
    Traceback (most recent call last):
    ValueError: sparsify: NaN or inf in 1 parameter(s) of the model given (0.weight), before any training: its initialisation or the checkpoint loaded into it is broken; masks and thresholds computed from it would mean nothing
    """
    if bad := nonfinite_parameters(model):
        raise ValueError(f"sparsify: NaN or inf in {len(bad)} parameter(s) of the model given ({_first(bad)}), "
                         "before any training: its initialisation or the checkpoint loaded into it is broken; masks and "
                         "thresholds computed from it would mean nothing")
