"""torch-pruning's DependencyGraph, built so that one op it cannot map does not sink the model.

`update_reshape_index_mapping` divides by a reshape's inferred output width, which is 0 when
the reshape reads the network input or a split of it (torchvision ShuffleNetV2's channel
shuffle after `chunk`): a ZeroDivisionError that aborted the whole graph. The guard leaves
that one reshape without an index mapping instead; groups through it are then analysed like
any other and removed by the randomized check (`soundness.py`) if they are not exact.
"""
from __future__ import annotations

import functools

import torch


def _install_guard() -> None:
    """Wrap torch-pruning's reshape mapping once (it runs again inside every get_pruning_group);
    only a call that would raise ZeroDivisionError behaves differently."""
    from torch_pruning.dependency import index_mapping as im

    orig = im.update_reshape_index_mapping
    if getattr(orig, "_compress_guard", False):
        return

    @functools.wraps(orig)
    def guarded(graph, node):
        try:
            return orig(graph, node)
        except ZeroDivisionError:  # width inferred as 0: leave this reshape unmapped
            return None

    guarded._compress_guard = True
    im.update_reshape_index_mapping = guarded


FLATTEN_LIMIT = 1 << 18  # indices one flatten may produce; legit: VGG's 512 channels x 7x7 = 25,088


class IndexExplosion(RuntimeError):
    """torch-pruning's index mapping multiplied through chained reshapes past any tensor's width."""


def _install_flatten_cap() -> None:
    """Chained reshapes (Swin's window partition, MaxViT's grid) make torch-pruning's forward
    flatten mapping multiply index lists by every stride in turn: get_pruning_group then ran
    for minutes. Past FLATTEN_LIMIT the root is refused (find_groups catches the error)."""
    from torch_pruning.dependency import index_mapping as im

    cls = im._FlattenIndexMapping
    orig = cls.__call__
    if getattr(orig, "_compress_guard", False):
        return

    @functools.wraps(orig)
    def capped(self, idxs):
        if not self.reverse and len(idxs) * self._stride > FLATTEN_LIMIT:
            raise IndexExplosion(f"index mapping through reshapes grows past {FLATTEN_LIMIT} indices")
        return orig(self, idxs)

    capped._compress_guard = True
    cls.__call__ = capped


def build_graph(model, args, kwargs, forward_fn=None):
    """DependencyGraph of `model` traced on (args, kwargs), with the reshape guard above."""
    import torch_pruning as tp

    fn = forward_fn or (lambda m, _: m(*args, **kwargs))
    _install_guard()
    _install_flatten_cap()
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=args, forward_fn=fn, verbose=False)
