"""Batches from a user's data: deterministic, resumable order and counts.

Moving inputs and calling the model on them live in compress/structure/tensors.py
(re-exported here for the training loop)."""

from __future__ import annotations

import math

import torch

from compress.errors import UserError
from compress.structure.tensors import call_model, to_device  # noqa: F401 — their home is structure/tensors.py


def split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise UserError("each data item must be an (inputs, target) pair")


def iter_batches(data, epoch: int, seed: int, batch_size: int, skip: int = 0, shard=None):
    """Yield (index, batch). Datasets get a permutation seeded by (seed, epoch): resumable exactly.

    `shard` picks this process's share of each global batch (data-parallel training).
    """
    if isinstance(data, torch.utils.data.DataLoader):
        for i, b in enumerate(data):
            if i >= skip:
                yield i, b
        return
    n = len(data)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    starts = range(0, n, batch_size)
    tensor_ds = isinstance(data, torch.utils.data.TensorDataset)
    collate = getattr(data, "collate", torch.utils.data.default_collate)  # e.g. padding token ids per batch
    for i, s in enumerate(starts):
        if i < skip:
            continue
        idx = order[s : s + batch_size]
        if shard is not None:
            idx = shard(idx)
        if tensor_ds:
            yield i, tuple(t[idx] for t in data.tensors)
        else:
            yield i, collate([data[int(j)] for j in idx])


def num_batches(data, batch_size: int) -> int:
    if isinstance(data, torch.utils.data.DataLoader):
        return len(data)
    return math.ceil(len(data) / batch_size)
