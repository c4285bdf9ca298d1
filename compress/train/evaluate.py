"""Evaluation and BatchNorm recalibration (the structured point needs statistics of its own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.train.data import call_model, iter_batches, split_batch, to_device


@torch.no_grad()
def evaluate(model, data, device, batch_size: int = 256, loss_fn=None) -> dict:
    """Accuracy (argmax over the last dim) and mean loss on `data`.

    A model with `compress_score(out, y)` (a wrapper whose task is not classification, e.g. an
    embedding's cosine to its starting model) is scored by the mean of that instead of argmax."""
    loss_fn = loss_fn or getattr(model, "compress_loss", None) or F.cross_entropy
    score = getattr(model, "compress_score", None)
    was = model.training
    model.eval()
    correct, count, loss_sum = 0, 0, 0.0
    for _, batch in (
        iter_batches(data, 0, 0, batch_size) if not isinstance(data, torch.utils.data.DataLoader) else enumerate(data)
    ):
        x, y = split_batch(batch)
        x, y = to_device(x, device), to_device(y, device)
        out = call_model(model, x)
        loss_sum += float(loss_fn(out, y)) * len(y)
        correct += score(out, y) if score is not None else int((out.argmax(-1) == y).sum())
        count += len(y)
    model.train(was)
    return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model, data, device, batch_size: int = 256, max_batches: int = 50) -> bool:
    """Recompute BatchNorm running statistics for the current weights (cumulative average).

    The structured point Ŵ is not the point whose activations the running statistics
    followed during training (RAMDA trains the average W), so evaluating or exporting Ŵ
    with stale statistics measures the wrong model: on digits-resnet it read 10-55% where
    Ŵ with recalibrated statistics reads 96-99%. Every rank uses the same (unsharded)
    batches, so the buffers stay identical under data parallelism.
    """
    bns = _bn_modules(model)
    if not bns:
        return False
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, batch in (
        iter_batches(data, 0, 12345, batch_size)
        if not isinstance(data, torch.utils.data.DataLoader)
        else enumerate(data)
    ):
        if i >= max_batches:
            break
        x, _ = split_batch(batch)
        call_model(model, to_device(x, device))
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return True


class _KeepBatchNormStats:
    """Restore BatchNorm buffers on exit: per-epoch recalibration must not disturb training."""

    def __init__(self, model):
        self.bns = _bn_modules(model)

    def __enter__(self):
        self.saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in self.bns]

    def __exit__(self, *exc):
        for m, buf in zip(self.bns, self.saved):
            for k, v in m.named_buffers(recurse=False):
                v.copy_(buf[k])
        return False
