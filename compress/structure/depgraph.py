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

from compress.structure.attention import is_conv1d


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


_MAPPED_LEFT: list = [None]  # indices index mappings may still produce while one group is built


def _spend(n: int) -> None:
    if _MAPPED_LEFT[0] is not None:
        _MAPPED_LEFT[0] -= n
        if _MAPPED_LEFT[0] < 0:
            raise IndexExplosion(f"index mappings through reshapes give its group over {FLATTEN_LIMIT} indices")


def _install_flatten_cap() -> None:
    """Chained reshapes (Swin's window partition, MaxViT's grid) make torch-pruning's forward
    flatten mapping multiply index lists by every stride in turn: get_pruning_group then ran
    for minutes. Past FLATTEN_LIMIT indices from one flatten, or from all index mappings
    (flatten either way, concat, split) while one group is built (MaxViT's attention roots:
    10,562 flattens just under the limit each, 500 s), the root is refused (find_groups catches
    the error). The largest legit total of the zoo is AlexNet's classifier, 46,080 forward."""
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping as im

    cls = im._FlattenIndexMapping
    orig = cls.__call__
    if getattr(orig, "_compress_guard", False):
        return

    @functools.wraps(orig)
    def capped(self, idxs):
        n = len(idxs) if self.reverse else len(idxs) * self._stride
        if n > FLATTEN_LIMIT:
            raise IndexExplosion(f"index mapping through reshapes grows past {FLATTEN_LIMIT} indices")
        _spend(n)
        return orig(self, idxs)

    def spending(call):
        @functools.wraps(call)
        def counted(self, idxs):
            _spend(len(idxs))
            return call(self, idxs)

        return counted

    get_group = tp.DependencyGraph.get_pruning_group

    @functools.wraps(get_group)
    def budgeted(self, *args, **kwargs):
        outer, _MAPPED_LEFT[0] = _MAPPED_LEFT[0], FLATTEN_LIMIT
        try:
            return get_group(self, *args, **kwargs)
        finally:
            _MAPPED_LEFT[0] = outer

    capped._compress_guard = True
    cls.__call__ = capped
    for other in (im._ConcatIndexMapping, im._SplitIndexMapping):
        other.__call__ = spending(other.__call__)
    tp.DependencyGraph.get_pruning_group = budgeted


GROUP_ITEM_LIMIT = 3000  # items of one pruning group; ResNet-50's largest has a few hundred


def _install_group_index() -> None:
    """torch-pruning's `Group.has_pruning_op` scans the whole group for every dependency it
    follows (quadratic: MaxViT's groups ran for minutes). Index the items by (target, handler)
    — the same answer — and refuse a root whose group grows past GROUP_ITEM_LIMIT items."""
    from torch_pruning.dependency import group as gm

    cls = gm.Group
    if getattr(cls.add_dep, "_compress_guard", False):
        return
    orig_add, orig_has = cls.add_dep, cls.has_pruning_op

    def add_dep(self, dep, idxs):
        if len(self._group) >= GROUP_ITEM_LIMIT:
            raise IndexExplosion(f"its dependency group grows past {GROUP_ITEM_LIMIT} items")
        orig_add(self, dep, idxs)
        ix = self.__dict__.setdefault("_compress_ix", {})
        ix.setdefault((dep.target, dep.handler), []).append(idxs)
        self._compress_n = len(self._group)

    def has_pruning_op(self, dep, idxs):
        if getattr(self, "_compress_n", -1) != len(self._group):  # changed behind add_dep: scan
            return orig_has(self, dep, idxs)
        return any(i == idxs for i in self._compress_ix.get((dep.target, dep.handler), ()))

    add_dep._compress_guard = True
    cls.add_dep, cls.has_pruning_op = add_dep, has_pruning_op


class _PadRecorder(torch.overrides.TorchFunctionMode):
    """Records each constant pad's fill value and padded dims by the grad_fn of its output:
    autograd keeps only the pad widths, and whether a zero channel stays zero depends on the value."""

    def __init__(self):
        super().__init__()
        self.pads: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.nn.functional.pad, torch.constant_pad_nd) and isinstance(out, torch.Tensor):
            if out.grad_fn is not None:
                self.pads[out.grad_fn] = _pad_call(func, args, kwargs)
        return out


def _pad_call(func, args, kwargs) -> tuple:
    """(ndim, pad, mode, fill value) of F.pad(x, pad, mode, value) or torch.constant_pad_nd(x, pad, value)."""
    x = args[0]
    pad = tuple(args[1] if len(args) > 1 else kwargs["pad"])
    if func is torch.constant_pad_nd:
        mode, value = "constant", kwargs.get("value", args[2] if len(args) > 2 else 0.0)
    else:
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
    return x.dim(), pad, mode, 0.0 if value is None else float(value)


_SHAPE_MEMO: dict | None = None  # live only while one update_index_mapping call runs


def _install_shape_memo() -> None:
    """torch-pruning infers a node's channel count by re-walking the graph from it, every input of
    every add in turn: on swin_t one mapping made 2.7 M calls (31 s of the find-time check remaps
    after each prune). Within one update_index_mapping the graph's widths do not change, so a
    node's answer is memoised with the depth budget it used: `recursive_depth` is a shared
    counter and past MAX_RECURSION_DEPTH a walk gives up, so a stored answer is reused only when
    the walk it replaces could not have reached that limit — the mapping is the same as before."""
    from torch_pruning.dependency import constants
    from torch_pruning.dependency import shape_infer as si

    if getattr(si.infer_out_channels_recursively, "_compress_guard", False):
        return

    def memoised(orig):
        @functools.wraps(orig)
        def walk(graph, node, recursive_depth):
            memo, start = _SHAPE_MEMO, recursive_depth[0]
            if memo is None:
                return orig(graph, node, recursive_depth)
            hit = memo.get((orig, node))
            if hit is not None and start + hit[1] <= constants.MAX_RECURSION_DEPTH:
                recursive_depth[0] = start + hit[1]
                return hit[0]
            out = orig(graph, node, recursive_depth)
            if recursive_depth[0] <= constants.MAX_RECURSION_DEPTH:  # no walk inside gave up
                memo[(orig, node)] = (out, recursive_depth[0] - start)
            return out

        walk._compress_guard = True
        return walk

    si.infer_out_channels_recursively = memoised(si.infer_out_channels_recursively)
    si.infer_in_channels_recursively = memoised(si.infer_in_channels_recursively)


def _install_mapping_once() -> None:
    """torch-pruning recomputes every reshape/expand index mapping in each get_pruning_group, by
    an unmemoised recursive shape inference: 36 calls on swin_t took 49 of find's 55 s. A graph
    marked `compress_frozen` maps once, until its owner clears `_compress_mapped` after a prune
    (extract does); any other graph remaps as torch-pruning intends."""
    from torch_pruning.dependency import index_mapping as im

    orig = im.update_index_mapping
    if getattr(orig, "_compress_guard", False):
        return

    @functools.wraps(orig)
    def once(graph):
        global _SHAPE_MEMO
        if getattr(graph, "compress_frozen", False) and getattr(graph, "_compress_mapped", False):
            return None
        _SHAPE_MEMO = {}
        try:
            orig(graph)
        finally:
            _SHAPE_MEMO = None
        graph._compress_mapped = True
        return None

    once._compress_guard = True
    im.update_index_mapping = once


def prune_conv1d(mod, idxs, outputs: bool) -> None:
    """Drop output features (weight dim 1, bias) or input features (weight dim 0) of a Conv1D."""
    dim, gone = (1 if outputs else 0), set(idxs)
    keep = torch.tensor([i for i in range(mod.weight.shape[dim]) if i not in gone], dtype=torch.long)
    mod.weight = torch.nn.Parameter(mod.weight.data.index_select(dim, keep).contiguous(), mod.weight.requires_grad)
    if outputs:
        if mod.bias is not None:
            mod.bias = torch.nn.Parameter(mod.bias.data.index_select(0, keep).contiguous(), mod.bias.requires_grad)
        mod.nf = len(keep)
    else:
        mod.nx = len(keep)


@functools.cache
def _conv1d_pruner():
    """torch-pruning's pruner for Hugging Face's Conv1D (GPT-2: y = x·W + b, W of shape (in, out)),
    which it does not know: registered per DependencyGraph, it makes the MLP's c_fc/c_proj layers
    like any Linear, so their neurons are grouped and removed the same way."""
    from torch_pruning.pruner.function import BasePruningFunc

    class Conv1DPruner(BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            prune_conv1d(layer, idxs, outputs=True)
            return layer

        def prune_in_channels(self, layer, idxs):
            prune_conv1d(layer, idxs, outputs=False)
            return layer

        def get_out_channels(self, layer):
            return layer.nf

        def get_in_channels(self, layer):
            return layer.nx

    return Conv1DPruner()


def build_graph(model, args, kwargs, forward_fn=None, frozen=False):
    """DependencyGraph of `model` traced on (args, kwargs), with the guards above; its
    `compress_pads` maps each constant pad's grad_fn to (ndim, pad, mode, value). frozen: the
    caller will not prune through this graph without clearing `_compress_mapped`, so index mappings
    are computed once per state of the model's widths."""
    import torch_pruning as tp

    fn = forward_fn or (lambda m, _: m(*args, **kwargs))
    _install_guard()
    _install_flatten_cap()
    _install_group_index()
    _install_mapping_once()
    _install_shape_memo()
    rec = _PadRecorder()
    DG = tp.DependencyGraph()
    DG.compress_frozen = frozen
    custom = {type(m): _conv1d_pruner() for m in model.modules() if is_conv1d(m)}
    with torch.enable_grad(), rec:
        DG.build_dependency(model, example_inputs=args, forward_fn=fn, verbose=False, customized_pruners=custom)
    DG.compress_pads = rec.pads
    return DG
