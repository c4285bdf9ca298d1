"""CostModel: FLOPs and parameters of the model `extract` would produce for a zero pattern, without extracting."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError
from compress.structure.attention import attention_units
from compress.structure.cost import ATTENTION_FLOPS, counted_attention
from compress.structure.tensors import as_args

# --------------------------------------------------------------------------- cost model


class _OpRecorder:
    """A FlopCounterMode that also remembers, per counted op, its FLOPs, the parameters among
    its operands (matched by storage, so `weight.t()` views count) and the module stack."""

    def __init__(self, model: nn.Module):
        from torch.utils.flop_counter import FlopCounterMode

        self.model = model
        self.records: list[tuple[int, list[str], tuple[str, ...], str]] = []
        storage: dict[int, list[str]] = {}
        for name, p in model.named_parameters():
            storage.setdefault(p.untyped_storage().data_ptr(), []).append(name)
        self.storage = storage
        self.stack: list[str] = []
        rec = self

        class Mode(FlopCounterMode):
            def _count_flops(self, func_packet, out, args, kwargs):
                if func_packet in self.flop_registry:
                    n = int(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
                    rec._record(n, str(func_packet), args, kwargs)
                return super()._count_flops(func_packet, out, args, kwargs)

        self.mode = Mode(display=False, custom_mapping=ATTENTION_FLOPS)

    def _record(self, n: int, op: str, args, kwargs) -> None:
        params: list[str] = []

        def visit(x):
            if isinstance(x, torch.Tensor):
                names = self.storage.get(x.untyped_storage().data_ptr())
                if names:
                    params.extend(names)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    visit(v)

        visit(args)
        visit(list(kwargs.values()))
        self.records.append((n, list(dict.fromkeys(params)), tuple(self.stack), op))

    def run(self, args, kwargs) -> int:
        def enter(name):
            def hook(mod, inp):
                self.stack.append(name)

            return hook

        def leave(mod, inp, out):
            self.stack.pop()

        handles = []
        for name, m in self.model.named_modules():
            handles.append(m.register_forward_pre_hook(enter(name)))
            handles.append(m.register_forward_hook(leave))
        try:
            with torch.no_grad(), counted_attention(), self.mode:
                self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return int(self.mode.get_total_flops())


class CostModel:
    """FLOPs and parameters of the model that `extract` would produce, for any zero pattern.

    `zero_mask`: bool tensor [n_groups] (or [K, n_groups] for K patterns at once), True
    where a group is exactly zero. Mirrors extraction exactly: a zero group removes its
    slices and dependents; a layer whose groups are *all* zero keeps its first one (the
    network cannot lose a whole layer). FLOPs are those of one forward pass on
    `example_inputs` (so they scale with its batch), counted like `compress.count_flops`.

    Ops that use no grouped parameter and sit outside an attention block are constant;
    `unattributed` lists those whose operands may still change width (none on the built-in
    models).
    """

    def __init__(self, model: nn.Module, groups, example_inputs):
        self.n_groups = len(groups)
        named = dict(model.named_parameters())
        pair_ix, sizes = self._index_slices(groups, named)
        self._index_params(named, pair_ix, sizes)
        self._index_layers(groups)
        self._attribute_flops(model, named, pair_ix, len(sizes), example_inputs)
        self.dense_params = int(sum(p.numel() for p in named.values()))
        self.block = simd_block()
        self.dense_flops_blocked = self.flops(torch.zeros(self.n_groups, dtype=torch.bool), self.block)

    def _index_slices(self, groups, named) -> tuple[dict, list[int]]:
        """Kept-size variables, one per (param, dim) any group touches, and for every index a
        group removes its flat position among them. Returns ({(param, dim): variable}, sizes)."""
        pair_ix: dict[tuple[str, int], int] = {}
        pos, gid = [], []
        offsets: list[int] = []
        sizes: list[int] = []
        total = 0
        for gi, g in enumerate(groups):
            for s in [*g.slices, *g.dependents]:
                if s.param not in named:
                    raise UserError(f"group {g.name}: parameter {s.param!r} is not in the model")
                key = (s.param, s.dim)
                if key not in pair_ix:
                    pair_ix[key] = len(sizes)
                    offsets.append(total)
                    n = named[s.param].shape[s.dim]
                    sizes.append(n)
                    total += n
                k = pair_ix[key]
                pos.extend(offsets[k] + i for i in s.indices)
                gid.extend([gi] * len(s.indices))
        self.pairs = list(pair_ix)
        self._flat_pos = torch.tensor(pos, dtype=torch.long)
        self._flat_gid = torch.tensor(gid, dtype=torch.long)
        self._flat_n = total
        self._pair_of_flat = (
            torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
            if sizes
            else torch.zeros(0, dtype=torch.long)
        )
        self._pair_size = torch.tensor(sizes, dtype=torch.long)
        return pair_ix, sizes

    def _index_params(self, named, pair_ix, sizes) -> None:
        """Every parameter's numel as a product over its dims of kept variables or constants."""
        const_vals = sorted({int(d) for p in named.values() for d in p.shape} | {1})
        const_ix = {v: len(sizes) + i for i, v in enumerate(const_vals)}
        self._consts = torch.tensor(const_vals, dtype=torch.long)
        self.param_names = list(named)
        p_ix = {n: i for i, n in enumerate(self.param_names)}
        maxdim = max([p.dim() for p in named.values()] + [1])
        dim_table = torch.full((len(named), maxdim), const_ix[1], dtype=torch.long)
        for i, (name, p) in enumerate(named.items()):
            for d, n in enumerate(p.shape):
                dim_table[i, d] = pair_ix.get((name, d), const_ix[int(n)])
        self._dim_table = dim_table
        self._pair_param = torch.tensor([p_ix[p] for p, _ in self.pairs], dtype=torch.long)

    def _index_layers(self, groups) -> None:
        """Extraction keeps one group of an all-zero layer (unless its groups are `whole`: an
        attention block removed entirely): layer id per group, first group per layer."""
        layers: OrderedDict[str, list[int]] = OrderedDict()
        for i, g in enumerate(groups):
            layers.setdefault(g.layer, []).append(i)
        self.layers = list(layers)
        self._layer_of = torch.empty(self.n_groups, dtype=torch.long)
        for li, idx in enumerate(layers.values()):
            self._layer_of[idx] = li
        self._layer_size = torch.tensor([len(v) for v in layers.values()], dtype=torch.long)
        self._layer_first = torch.tensor([v[0] for v in layers.values()], dtype=torch.long)
        self._layer_whole = torch.tensor([groups[v[0]].whole for v in layers.values()], dtype=torch.bool)

    def _attribute_flops(self, model, named, pair_ix, n_pairs, example_inputs) -> None:
        """One traced forward pass; every counted op's FLOPs go to the one weight matrix it
        uses (per element of it), to an attention unit's kept heads, or to a constant."""
        args, kwargs = as_args(example_inputs)
        was = model.training
        model.eval()
        try:
            rec = _OpRecorder(model)
            self.dense_flops = rec.run(args, kwargs)
        finally:
            model.train(was)
        head_pair = {}
        for u in attention_units(model):  # per kept head (a per-head table) or out-projection column
            key = u.tables[0] if u.tables else (u.param("o", "weight"), 0 if u.transposed else 1)
            if key in pair_ix:
                head_pair[u.holder] = (pair_ix[key], named[key[0]].shape[key[1]])
        p_ix = {n: i for i, n in enumerate(self.param_names)}
        coef_param = torch.zeros(len(named), dtype=torch.long)
        coef_pair = torch.zeros(n_pairs, dtype=torch.long)
        const = 0
        self.unattributed: list[str] = []
        for n, params, stack, op in rec.records:
            mats = [p for p in params if named[p].dim() >= 2]
            if len(mats) == 1:
                numel = named[mats[0]].numel()
                if n % numel == 0:
                    coef_param[p_ix[mats[0]]] += n // numel
                    continue
            holder = next((m for m in reversed(stack) if m in head_pair), None)
            if not mats and holder is not None:
                k, rows = head_pair[holder]
                if n % rows == 0:
                    coef_pair[k] += n // rows
                    continue
            const += n
            self.unattributed.append(f"{op} in {stack[-1] if stack and stack[-1] else '<model>'} ({n} FLOPs)")
        self._coef_param, self._coef_pair, self._const = coef_param, coef_pair, const

    # ---- the pattern extraction really removes

    def _as_batch(self, zero_mask) -> tuple[torch.Tensor, bool]:
        z = torch.as_tensor(zero_mask, dtype=torch.bool).cpu()
        single = z.dim() == 1
        z = z.reshape(-1, self.n_groups) if z.numel() or self.n_groups == 0 else z.reshape(1, 0)
        if z.shape[-1] != self.n_groups:
            raise ValueError(f"zero_mask has {z.shape[-1]} entries, the model has {self.n_groups} groups")
        return z, single

    def removed(self, zero_mask) -> torch.Tensor:
        """The groups extraction removes: `zero_mask` minus the first group of every all-zero layer
        (but an all-zero attention block whose form allows it goes whole)."""
        z, single = self._as_batch(zero_mask)
        z = z.clone()
        if self.n_groups:
            zeros = torch.zeros(z.shape[0], len(self.layers), dtype=torch.long).index_add_(1, self._layer_of, z.long())
            full = (zeros == self._layer_size) & ~self._layer_whole
            rows, layers = torch.nonzero(full, as_tuple=True)
            z[rows, self._layer_first[layers]] = False
        return z[0] if single else z

    def _counts(self, zero_mask) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(kept size per (param, dim) variable [K, n_pairs], numel per parameter [K, n_params])."""
        z, single = self._as_batch(self.removed(zero_mask))
        K = z.shape[0]
        flat = torch.zeros(K, self._flat_n, dtype=torch.long)
        if self._flat_n:
            flat.scatter_reduce_(1, self._flat_pos.expand(K, -1), z[:, self._flat_gid].long(), "amax")
        cut = torch.zeros(K, len(self.pairs), dtype=torch.long).index_add_(1, self._pair_of_flat, flat)
        kept = self._pair_size - cut
        table = torch.cat([kept, self._consts.expand(K, -1)], 1)
        numel = table[:, self._dim_table].prod(-1)
        return kept, numel, single

    def params(self, zero_mask):
        """Parameter count after extraction (int, or LongTensor [K] for a batch of masks)."""
        _, numel, single = self._counts(zero_mask)
        out = numel.sum(-1)
        return int(out[0]) if single else out

    def flops(self, zero_mask, block: int = 1):
        """FLOPs of one forward pass on `example_inputs` after extraction (int, or LongTensor [K]).

        block > 1: every pruned channel count above block/2 rounded up to a multiple of
        `block` — the work a blocked-layout kernel really does. ONNX Runtime's CPU convolutions
        run in NCHWc blocks of 8 (AVX2) or 16 (AVX-512) channels; measured on resnet20 (batch 1,
        one thread, AVX-512), widths 24 and 32 cost the same, 40 and 48 too, while 8 channels run
        as cheaply as their FLOPs say. The latency model is fitted on this quantity."""
        kept, numel, single = self._counts(zero_mask)
        if block > 1:
            kept = torch.where(kept <= block // 2, kept, (kept + block - 1) // block * block)
            table = torch.cat([kept, self._consts.expand(kept.shape[0], -1)], 1)
            numel = table[:, self._dim_table].prod(-1)
        out = (numel * self._coef_param).sum(-1) + (kept * self._coef_pair).sum(-1) + self._const
        return int(out[0]) if single else out

    def cost(self, zero_mask, kind: str):
        """`flops`, `params` or `flops_blocked` (FLOPs with channels padded to `self.block`) as a
        fraction of the dense model (float, or float64 tensor [K])."""
        if kind == "flops":
            v, d = self.flops(zero_mask), self.dense_flops
        elif kind == "params":
            v, d = self.params(zero_mask), self.dense_params
        elif kind == "flops_blocked":
            v, d = self.flops(zero_mask, self.block), self.dense_flops_blocked
        else:
            raise ValueError(f"cost kind must be 'flops', 'params' or 'flops_blocked', got {kind!r}")
        return v / d if isinstance(v, int) else v.double() / d

    def minimum(self, kind: str) -> float:
        """The smallest reachable fraction: every group zero (one kept per layer)."""
        return self.cost(torch.ones(self.n_groups, dtype=torch.bool), kind)

    def savings(self, zero_mask, kind: str) -> torch.Tensor:
        """First-order cost (fraction of dense) that removing each still-present group would save
        on top of `zero_mask` (float64 [n_groups]; 0 for removed groups): Σ over its slices and
        dependents of entries × coefficient, at the current kept sizes. Used for ranking only."""
        kept, numel, _ = self._counts(torch.as_tensor(zero_mask, dtype=torch.bool).reshape(1, -1))
        kept, numel = kept[0].double(), numel[0].double()
        if kind in ("flops", "flops_blocked"):  # blocked FLOPs move in steps: rank by their smooth version
            per_param, per_pair, dense = self._coef_param.double(), self._coef_pair.double(), self.dense_flops
        else:
            per_param, per_pair, dense = (
                torch.ones(len(self.param_names), dtype=torch.float64),
                torch.zeros(len(self.pairs), dtype=torch.float64),
                self.dense_params,
            )
        # d numel(P) / d kept(P, d) = numel(P) / kept(P, d): one entry of (P, d) costs that much
        pair_param = self._pair_param
        per_index = per_param[pair_param] * numel[pair_param] / kept.clamp_min(1) + per_pair
        flat_w = per_index[self._pair_of_flat]
        s = torch.zeros(self.n_groups, dtype=torch.float64).index_add_(0, self._flat_gid, flat_w[self._flat_pos])
        s[torch.as_tensor(zero_mask, dtype=torch.bool)] = 0.0
        return s / dense


def simd_block() -> int:
    """Channel block of ONNX Runtime's NCHWc CPU kernels here: 16 with AVX-512, else 8."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8
