"""What a run feeds the model: each epoch's order (drawn from the seed and the epoch number, not
from a running generator, so a resumed run continues it), the batches in that order, and the
adaptation of the data's image channels to the model's input."""
from __future__ import annotations

import torch


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _train_size(n: int, batch_size: int) -> int:
    """The samples of an epoch's order a run trains on: all but a last batch of one sample, on which
    BatchNorm fails ("Expected more than 1 value per channel") after a whole epoch.

    >>> _train_size(1437, 64), _train_size(1437, 718), _train_size(1, 64)
    (1437, 1436, 1)
    """
    return n - 1 if n > 1 and n % batch_size == 1 else n


def _batches(dataset, indices: torch.Tensor, batch_size: int, workers: int = 0, fix_channels=None):
    """Batches of ``dataset`` in the order ``indices``; tensors are sliced, other datasets go
    through a DataLoader over exactly those indices."""
    fix = fix_channels or (lambda x: x)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        x_all, y_all = dataset.tensors
        for i in range(0, len(indices), batch_size):
            idx = indices[i:i + batch_size]
            yield fix(x_all[idx]), y_all[idx]
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices.tolist()), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    for x, y in loader:
        yield fix(x), y


def _channel_fixer(model_channels: int | None, data_channels: int):
    if model_channels is None or model_channels == data_channels:
        return None
    if data_channels == 1:
        return lambda x: x.expand(-1, model_channels, *x.shape[2:])
    if model_channels == 1:
        return lambda x: x.mean(1, keepdim=True)
    raise ValueError(f"the model takes {model_channels}-channel images and the data has {data_channels} channels")
