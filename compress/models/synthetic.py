"""Tiny seeded synthetic data sets for built-in models that have no bundled data.

They exist so that every built-in model can be fine-tuned end to end offline (a smoke
test of the pipeline, not a benchmark): each class is a fixed random prototype plus
noise, so the task is learnable and accuracy is meaningful.
"""

from __future__ import annotations

import torch


def synthetic_images(shape=(3, 32, 32), classes=10, train=512, test=256, noise=1.0, seed=0):
    """(train, eval) TensorDatasets of images = class prototype + Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, *shape, generator=g)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = protos[y] + noise * torch.randn(n, *shape, generator=g)
        return torch.utils.data.TensorDataset(x, y)

    return make(train), make(test)


def synthetic_tokens(vocab=30522, seq_len=32, classes=2, train=512, test=256, seed=0):
    """(train, eval) TensorDatasets of int64 token ids; the label says which of two marker
    tokens occurs more often, so the class depends on the whole sequence."""
    g = torch.Generator().manual_seed(seed)
    markers = torch.tensor([1000, 2000])

    def make(n):
        x = torch.randint(5000, vocab, (n, seq_len), generator=g)
        x[:, 0] = 101  # a [CLS]-like first token
        y = torch.randint(0, classes, (n,), generator=g)
        pos = torch.rand(n, seq_len, generator=g).argsort(1)[:, :6] + 1
        pos = pos.clamp(max=seq_len - 1)
        counts = torch.where(y[:, None] == 1, torch.tensor([2, 4]), torch.tensor([4, 2]))
        for i in range(n):
            x[i, pos[i, : counts[i, 0]]] = markers[0]
            x[i, pos[i, counts[i, 0] : counts[i, 0] + counts[i, 1]]] = markers[1]
        return torch.utils.data.TensorDataset(x, y)

    return make(train), make(test)
