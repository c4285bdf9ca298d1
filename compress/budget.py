"""Compress to a budget: the cost of a zero pattern, and a λ controller that hits a target.

Users state a budget ("half the FLOPs", "under 3 ms at batch 1"); λ is the controller's
variable. Three pieces:

* `CostModel` — FLOPs (torch.utils.flop_counter semantics) and parameter count of the
  model that `extract` *would* produce for a zero pattern, without extracting. Every
  counted op of one traced forward pass is attributed to the parameter it multiplies
  (conv/linear: FLOPs = 2·(batch·spatial or tokens)·weight entries, so they scale with
  the kept entries of that weight) or, for the weight-free matmuls inside an attention
  block, to its kept heads. Kept sizes come from the groups' slices *and* dependents
  (consumers lose input columns too), so the whole model is integer arithmetic on
  index tensors — exact, and fast enough to call for thousands of patterns.
* `Budget` + `BudgetController` — epoch/step callbacks that set λ so the structured
  point's cost follows a planned trajectory to the target, then freeze the zero pattern
  for a final phase; an enforcement step removes the weakest groups per unit of cost if
  the target still does not hold, and a step callback keeps every removed group exactly zero.
* `LatencyModel` — latency is measured, never assumed: extract + export + ONNX Runtime
  benchmark at a few calibration patterns, a least-squares fit of latency on blocked FLOPs
  (channel counts padded the way ONNX Runtime's NCHWc kernels pad them), re-measured when
  training reaches the target and at the freeze, and the final model measured again.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .groups import _as_args, attention_units
from .io import UserError, atomic_write_json

__all__ = ["CostModel", "Budget", "BudgetController", "CosineAdamW", "LatencyModel", "align_widths",
           "budget_config", "finetune_to_budget", "budget_summary"]


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

        self.mode = Mode(display=False)

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
            with torch.no_grad(), self.mode:
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
    models) — `check()` compares against a real extraction for custom models.
    """

    def __init__(self, model: nn.Module, groups, example_inputs):
        self.n_groups = len(groups)
        self.example_inputs = example_inputs
        named = dict(model.named_parameters())
        # ---- kept-size variables: one per (param, dim) touched by any group
        pair_ix: dict[tuple[str, int], int] = {}
        pos, gid, pair_of = [], [], []
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
        self._pair_of_flat = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)) \
            if sizes else torch.zeros(0, dtype=torch.long)
        self._pair_size = torch.tensor(sizes, dtype=torch.long)
        # ---- every parameter's numel = product of its dims' sizes (kept variables or constants)
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
        # ---- extraction keeps one group of an all-zero layer: layer id per group, first group per layer
        layers: OrderedDict[str, list[int]] = OrderedDict()
        for i, g in enumerate(groups):
            layers.setdefault(g.layer, []).append(i)
        self.layers = list(layers)
        self._layer_of = torch.empty(self.n_groups, dtype=torch.long)
        for li, idx in enumerate(layers.values()):
            self._layer_of[idx] = li
        self._layer_size = torch.tensor([len(v) for v in layers.values()], dtype=torch.long)
        self._layer_first = torch.tensor([v[0] for v in layers.values()], dtype=torch.long)

        # ---- FLOPs: one traced forward pass, every counted op attributed to a unit
        args, kwargs = _as_args(example_inputs)
        was = model.training
        model.eval()
        try:
            rec = _OpRecorder(model)
            self.dense_flops = rec.run(args, kwargs)
        finally:
            model.train(was)
        head_pair = {}
        for u in attention_units(model):
            key = (f"{u.q}.weight", 0)
            if key in pair_ix:
                head_pair[u.holder] = (pair_ix[key], named[f"{u.q}.weight"].shape[0])
        coef_param = torch.zeros(len(named), dtype=torch.long)
        coef_pair = torch.zeros(len(sizes), dtype=torch.long)
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
        self.dense_params = int(sum(p.numel() for p in named.values()))
        self.block = simd_block()
        self.dense_flops_blocked = self.flops(torch.zeros(self.n_groups, dtype=torch.bool), self.block)

    # ---- the pattern extraction really removes

    def _as_batch(self, zero_mask) -> tuple[torch.Tensor, bool]:
        z = torch.as_tensor(zero_mask, dtype=torch.bool).cpu()
        single = z.dim() == 1
        z = z.reshape(-1, self.n_groups) if z.numel() or self.n_groups == 0 else z.reshape(1, 0)
        if z.shape[-1] != self.n_groups:
            raise ValueError(f"zero_mask has {z.shape[-1]} entries, the model has {self.n_groups} groups")
        return z, single

    def removed(self, zero_mask) -> torch.Tensor:
        """The groups extraction removes: `zero_mask` minus the first group of every all-zero layer."""
        z, single = self._as_batch(zero_mask)
        z = z.clone()
        if self.n_groups:
            zeros = torch.zeros(z.shape[0], len(self.layers), dtype=torch.long).index_add_(1, self._layer_of, z.long())
            full = zeros == self._layer_size
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
            per_param, per_pair, dense = torch.ones(len(self.param_names), dtype=torch.float64), \
                torch.zeros(len(self.pairs), dtype=torch.float64), self.dense_params
        # d numel(P) / d kept(P, d) = numel(P) / kept(P, d): one entry of (P, d) costs that much
        pair_param = self._pair_param
        per_index = per_param[pair_param] * numel[pair_param] / kept.clamp_min(1) + per_pair
        flat_w = per_index[self._pair_of_flat]
        s = torch.zeros(self.n_groups, dtype=torch.float64).index_add_(0, self._flat_gid, flat_w[self._flat_pos])
        s[torch.as_tensor(zero_mask, dtype=torch.bool)] = 0.0
        return s / dense

    def check(self, model: nn.Module, groups, zero_mask) -> dict:
        """Zero the masked groups of a copy of `model`, really extract it, and compare counts."""
        from .cost import count_flops, count_params
        from .extract import extract
        from .groups import GroupList, bind_groups

        work = copy.deepcopy(model)
        gl = bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in groups]), work)
        ZeroKeeper(gl, zero_mask).apply()
        small, _ = extract(work, gl, self.example_inputs)
        args, kwargs = _as_args(self.example_inputs)
        real_flops = count_flops(small, args) if not kwargs else None
        return {"flops": real_flops, "flops_predicted": self.flops(zero_mask),
                "params": count_params(small), "params_predicted": self.params(zero_mask)}


def simd_block() -> int:
    """Channel block of ONNX Runtime's NCHWc CPU kernels here: 16 with AVX-512, else 8."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


class ZeroKeeper:
    """Keeps a fixed set of groups exactly zero: in the parameters and in optimizer state buffers
    (RAMDA's Ŵ and W⁰, Adam's moments: a frozen entry's state never feeds a survivor's update).

    The (tensor, dim, indices) triples are built once, so re-zeroing after every optimizer
    step is a few `index_fill_` calls per parameter, not a loop over groups.
    """

    def __init__(self, groups, mask: torch.Tensor, state_keys=("w_hat", "w0", "exp_avg", "exp_avg_sq")):
        by_pd: dict[tuple[int, int], tuple[torch.Tensor, int, list]] = {}
        for i in torch.nonzero(torch.as_tensor(mask, dtype=torch.bool)).flatten().tolist():
            g = groups[i]
            for s, t in zip(g.slices, g.tensors):
                by_pd.setdefault((id(t), s.dim), (t, s.dim, []))[2].extend(s.indices)
        self.items = [(t, d, torch.tensor(sorted(set(ix)), dtype=torch.long, device=t.device))
                      for t, d, ix in by_pd.values()]
        self.state_keys = tuple(state_keys)

    @torch.no_grad()
    def apply(self, optimizer=None) -> None:
        for t, d, ix in self.items:
            t.index_fill_(d, ix, 0.0)
            st = optimizer.state.get(t) if optimizer is not None else None
            if st:
                for k in self.state_keys:
                    buf = st.get(k)
                    if isinstance(buf, torch.Tensor) and buf.shape == t.shape:
                        buf.index_fill_(d, ix, 0.0)


# --------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    """Exactly one target: `flops` or `params` as a fraction in (0, 1) of the dense model, or
    `latency_ms` measured with ONNX Runtime (CPU) at `batch` with `threads` intra-op threads
    (None: all cores) on the machine that trains."""

    flops: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    batch: int = 1
    threads: int | None = None

    def __post_init__(self):
        given = [k for k in ("flops", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError("give exactly one budget target: flops, params or latency_ms "
                            f"(--target-flops, --target-params, --target-latency-ms); got {', '.join(given) or 'none'}")
        for k, flag in (("flops", "--target-flops"), ("params", "--target-params")):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
                raise UserError(f"{flag} must be a fraction of the dense model in (0, 1), got {v}")
        if self.latency_ms is not None and not (isinstance(self.latency_ms, (int, float)) and 0 < self.latency_ms < math.inf):
            raise UserError(f"--target-latency-ms must be a positive number of milliseconds, got {self.latency_ms}")
        if self.latency_ms is None and (self.batch != 1 or self.threads is not None):
            raise UserError("--bench-batch and --bench-threads only apply to a latency target (--target-latency-ms)")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise UserError(f"--bench-batch must be a positive integer, got {self.batch}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(f"--bench-threads must be a positive integer (or unset for all cores), got {self.threads}")

    @property
    def kind(self) -> str:
        return "flops" if self.flops is not None else "params" if self.params is not None else "latency"

    @property
    def target(self) -> float:
        return float(getattr(self, "latency_ms" if self.kind == "latency" else self.kind))

    def describe(self) -> str:
        if self.kind == "latency":
            th = "all cores" if self.threads is None else f"{self.threads} thread{'s' * (self.threads > 1)}"
            return f"latency ≤ {self.target:g} ms (ONNX Runtime CPU, batch {self.batch}, {th})"
        return f"{self.kind} ≤ {self.target:g} of the dense model"

    def check_reachable(self, cm: CostModel) -> None:
        """UserError when even the smallest valid model (every group removed, one kept per layer) is above."""
        if self.kind == "latency":
            return
        floor = cm.minimum(self.kind)
        if self.target < floor:
            raise UserError(f"--target-{self.kind} {self.target:g} is below the smallest valid model: removing every "
                            f"removable group (one kept per layer) leaves {floor:.4f} of the dense {self.kind}")


# --------------------------------------------------------------------------- enforcement


def enforce(cm: CostModel, zero: torch.Tensor, norms: torch.Tensor, kind: str, target: float):
    """The zero pattern that holds the target: `zero` plus the fewest weakest groups.

    Groups are ranked by ‖Ŵ_g‖ per unit of cost they save (first-order, at `zero`); the
    smallest prefix of that ranking whose removal brings the exact cost to ≤ target is
    found by bisection (the cost never rises when groups are added). Returns (mask, added).
    """
    zero = torch.as_tensor(zero, dtype=torch.bool).clone()
    if cm.cost(zero, kind) <= target:
        return zero, torch.zeros_like(zero)
    sav = cm.savings(zero, kind)
    score = norms.double() / sav.clamp_min(1e-300)
    score[zero] = math.inf
    score[sav <= 0] = math.inf  # removing it saves nothing (first order): last resort
    order = torch.argsort(score, stable=True)[: int((~zero).sum())]
    lo, hi = 0, len(order)  # cost(prefix hi) ≤ target is guaranteed by check_reachable

    def with_prefix(k):
        m = zero.clone()
        m[order[:k]] = True
        return m

    if cm.cost(with_prefix(hi), kind) > target:
        raise UserError(f"the {kind} target {target:g} cannot be reached even with every group removed "
                        f"({cm.minimum(kind):.4f})")
    while lo < hi:
        mid = (lo + hi) // 2
        if cm.cost(with_prefix(mid), kind) <= target:
            hi = mid
        else:
            lo = mid + 1
    mask = with_prefix(lo)
    return mask, mask & ~zero


def revive(cm: CostModel, zero: torch.Tensor, strength: torch.Tensor, kind: str, target: float):
    """Give back zero groups while the cost stays ≤ target (the controller overshot): the
    strongest first by `strength` per unit of cost (e.g. ‖W_g‖ of the iterate). Returns (mask, revived)."""
    zero = torch.as_tensor(zero, dtype=torch.bool).clone()
    cands = torch.nonzero(zero).flatten()
    if not len(cands):
        return zero, torch.zeros_like(zero)
    # cost per group if it alone came back: savings at the pattern with it removed ≈ savings at zero \ {g}
    back = cm.savings(torch.zeros_like(zero), kind)[cands]  # dense-model cost of the group, for ranking only
    score = strength.double()[cands] / back.clamp_min(1e-300)
    order = cands[torch.argsort(score, descending=True, stable=True)]

    def without(k):
        m = zero.clone()
        m[order[:k]] = False
        return m

    lo, hi = 0, len(order)
    while lo < hi:  # largest k with cost(without k) ≤ target
        mid = (lo + hi + 1) // 2
        if cm.cost(without(mid), kind) <= target:
            lo = mid
        else:
            hi = mid - 1
    mask = without(lo)
    return mask, zero & ~mask


def _aligned_once(cm: CostModel, zero, weak, strong, kind, target, align, kinds, floor=None):
    """One alignment pass (see `align_widths`): round down per layer, then give back blocks greedily;
    below `floor`, exchange moves (one width some blocks down, then the greedy again) while the cost rises."""
    members = [torch.nonzero(cm._layer_of == li).flatten() for li in range(len(cm.layers))]
    active = [li for li, m in enumerate(members) if kinds[int(m[0])] != "head" and len(m) >= align]
    sub = 8 if align > 8 and align % 8 == 0 else align  # below one block: ORT's smallest block (AVX2)

    def valid(k, n):
        """Widths that need no rounding: multiples of `align`, below it multiples of `sub`, below
        `sub` anything (rounding down would empty the layer), and the full width."""
        return k == n or k < sub or k % (align if k >= align else sub) == 0

    def next_valid(k, n):
        if k >= align:
            return min(n, (k // align + 1) * align)
        return min(n, align, (k // sub + 1) * sub)

    def drop_weakest(mask, li, n):
        m = members[li]
        kept = m[~mask[m]]
        by_weak = kept[torch.argsort(strong[kept], stable=True)]
        by_weak = by_weak[torch.argsort(weak[by_weak], stable=True)]  # ‖Ŵ_g‖, ties by ‖W_g‖
        mask[by_weak[:n]] = True

    def give_back(mask, skip=None):
        """The strongest whole block (per unit of cost) that still fits, until none fits."""
        while True:
            blocks = []
            for li in active:
                m = members[li]
                k = int((~mask[m]).sum())
                if k == len(m) or li == skip:
                    continue
                need = next_valid(k, len(m)) - k
                cand = m[mask[m]]
                blocks.append(cand[torch.argsort(strong[cand], descending=True, stable=True)[:need]])
            if not blocks:
                return mask
            trials = mask.expand(len(blocks), -1).clone()
            for j, b in enumerate(blocks):
                trials[j, b] = False
            cost = torch.as_tensor(cm.cost(trials, kind), dtype=torch.float64).reshape(-1)
            fits = cost <= target
            if not bool(fits.any()):
                return mask
            base = float(cm.cost(mask, kind))
            score = torch.tensor([float(strong[b].sum()) for b in blocks], dtype=torch.float64) \
                / (cost - base).clamp_min(1e-300)
            score[~fits] = -math.inf
            mask[blocks[int(torch.argmax(score))]] = False

    mask = zero.clone()
    for li in active:  # round down: each width drops its weakest extra groups
        k, n = int((~mask[members[li]]).sum()), len(members[li])
        if not valid(k, n):
            drop_weakest(mask, li, k - max(w for w in range(k) if valid(w, n)))
    mask = give_back(mask)
    best = float(cm.cost(mask, kind))
    improved = True
    while floor is not None and best < floor and improved:
        improved, current = False, mask
        for li in active:
            k, n = int((~current[members[li]]).sum()), len(members[li])
            for lower in [w for w in range(k - 1, sub - 1, -1) if valid(w, n)]:
                trial = current.clone()
                drop_weakest(trial, li, k - lower)
                trial = give_back(trial, skip=li)
                c = float(cm.cost(trial, kind))
                if c > best:
                    mask, best, improved = trial, c, True
    return mask


def align_widths(cm: CostModel, groups, zero, weak, strong, kind: str, target: float, align: int,
                 floor: float | None = None):
    """The zero pattern whose every channel/neuron width keeps a multiple of `align` groups.

    ONNX Runtime's CPU convolutions run in blocks of `simd_block()` channels: on digits-resnet at
    0.5 of the FLOPs (ORT, 1 thread, AVX-512) 16-aligned widths ran 1.62× faster than dense at
    batch 1, the unaligned pattern of the same run 0.85× (examples/budget_table.py). Each width with ≥ `align` kept groups drops its weakest extra ones
    (`weak`: ‖Ŵ_g‖, like `enforce`), then whole blocks of zero groups come back, the strongest
    per unit of cost first (`strong`: ‖W_g‖, like `revive`), while the exact cost stays ≤
    `target`; a give-back takes a width to its next valid size. Valid: multiples of `align`; below
    `align`, multiples of 8 when `align` is a multiple of 8 above it (AVX-512's 16 here: a width
    of 13 runs as 16, while 8 matches AVX2's block and `compress export --align 8`); any width
    below that (rounding down would empty the layer); the full width. Layers of fewer than
    `align` groups and heads are left alone. `zero` must cost ≤ target; so does the result.
    If the aligned cost falls below `floor` (the greedy stops at a cheap corner: digits-resnet at
    0.45 FLOPs, align 8, turned 32;19,9 into 32;16,8 = 0.38 where 16;32,24 = 0.44 fits), exchange
    moves take one width one or more blocks down and run the give-back again while the cost rises
    (the best move per sweep); still below `floor`, `align` is halved (down to 8), then alignment
    is skipped, so a FLOP budget still lands in its window. Returns (mask, info).
    """
    zero = torch.as_tensor(zero, dtype=torch.bool).clone()
    weak, strong = torch.as_tensor(weak).double().cpu(), torch.as_tensor(strong).double().cpu()
    kinds = [g.kind for g in groups]
    info = {"align_requested": int(align), "align": 1, "cost_before": float(cm.cost(zero, kind)),
            "widths_before": _kept_widths(cm, zero)}
    a = int(align)
    while a > 1:
        mask = _aligned_once(cm, zero, weak, strong, kind, target, a, kinds, floor)
        c = float(cm.cost(mask, kind))
        if floor is None or c >= floor or c >= info["cost_before"]:
            info.update(align=a, cost=c, removed=int((mask & ~zero).sum()), given_back=int((zero & ~mask).sum()),
                        widths=_kept_widths(cm, mask))
            return mask, info
        info.setdefault("rejected", []).append({"align": a, "cost": c, "widths": _kept_widths(cm, mask)})
        a = a // 2 if a // 2 >= 8 else 1
    info.update(cost=info["cost_before"], removed=0, given_back=0, widths=info["widths_before"])
    return zero, info


def _kept_widths(cm: CostModel, mask) -> dict:
    """Groups kept per layer (what extraction leaves: an all-zero layer keeps one)."""
    removed = cm.removed(mask).long()
    cut = torch.zeros(len(cm.layers), dtype=torch.long).index_add_(0, cm._layer_of, removed)
    return dict(zip(cm.layers, (cm._layer_size - cut).tolist()))


# --------------------------------------------------------------------------- λ controller


class CosineAdamW(torch.optim.AdamW):
    """AdamW whose lr follows a cosine from `lr` to 0 over `total_steps` of its own steps.

    The budget run's final phase owns its schedule: every step sets the lr from AdamW's own step
    count (overriding the training loop's per-epoch lr), so a checkpoint restores the position exactly."""

    def __init__(self, params, lr: float, total_steps: int, weight_decay: float = 1e-4):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.base_lr, self.total_steps = float(lr), max(1, int(total_steps))

    def lr_at(self, k: int) -> float:
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(k, self.total_steps) / self.total_steps))

    def step(self, closure=None):
        k = next((int(st["step"]) for st in self.state.values() if "step" in st), 0)
        for g in self.param_groups:
            g["lr"] = self.lr_at(k)
        return super().step(closure)


def _structured_zero(opt, groups) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero mask, ‖Ŵ_g‖) of the structured point: the optimizer's Ŵ when it keeps one."""
    if hasattr(opt, "group_norms"):
        norms = opt.group_norms().cpu()
    else:
        from .groups import group_norms

        norms = group_norms(groups).cpu()
    return norms == 0, norms


@torch.no_grad()
def critical_lams(opt) -> torch.Tensor | None:
    """Per group, the λ above which the optimizer's *next* prox makes the group exactly zero.

    For the dual-averaging methods the structured point is a function of the dual state:
    Ŵ_g = 0 iff ‖P W⁰ − V‖_g ≤ α λ w_g (ALGORITHMS §2a; RAMDA: P = cbrt(U) + ε, RMDA:
    P = β = √(t+1)), so λ*_g = ‖P W⁰ − V‖_g / (α w_g) with the α of the next step (zero
    gradient assumed). The controller uses it to pick the λ whose zero pattern is on plan
    exactly. None for optimizers without such a state (ProxSGD, ProxAdam: the zero test
    depends on the next gradient) or with several param groups.
    """
    kind = type(opt).__name__
    if kind not in ("RAMDA", "RMDA") or len(opt.param_groups) != 1 or not hasattr(opt, "index"):
        return None
    g = opt.param_groups[0]
    t = g.get("t", 0)
    alpha = g.get("alpha", 0.0) + g["lr"] * math.sqrt(t + 1)
    if alpha <= 0:
        return None
    rows = []
    for p in opt.index.params:
        st = opt.state.get(p)
        if not st or "v" not in st or "w0" not in st:
            return None
        if kind == "RAMDA":
            rows.append((st["u_cbrt"] + g["eps"]) * st["w0"] - st["v"])
        else:
            rows.append(math.sqrt(t + 1) * st["w0"] - st["v"])
    a = opt.index.group_sq_norms(rows).sqrt().cpu()
    return a / (alpha * opt.index.weights.cpu().clamp_min(1e-300))


class BudgetController:
    """Drives the structured point's cost to the target by the freeze epoch, then keeps the
    frozen zero pattern exactly zero while the survivors train with λ = `final_lam`.

    Sparsity phase (epochs before `freeze_epoch`): after the first step and `controls_per_epoch`
    times per epoch, λ is set for a planned cost p(s) = T + (1 − T)(1 − s)³ (the gradual
    pruning schedule of Zhu & Gupta, reaching T at `plan_end` of the phase). RAMDA/RMDA
    (`critical_lams`): λ is the smallest value whose zero pattern at the current dual state
    costs ≤ p — exact, so the cost tracks the plan instead of oscillating around it (a
    multiplicative rule did: the cost of Ŵ falls off a cliff over a 2× range of λ). Other
    optimizers: λ is multiplied by exp(gain·(c − p)/(1 − T)), at most `max_factor`, when the
    cost c is above plan, divided likewise when c < T − tol, held otherwise.

    Freeze (end of epoch `freeze_epoch` − 1): Ŵ is committed into the parameters; if the cost
    is above T, `enforce` removes the weakest groups; if it is below T − tol, `revive` gives
    back the zero groups whose iterate W is strongest (RAMDA's W keeps their values) while the
    cost stays ≤ T. Then `align_widths` makes every channel/neuron width a multiple of `align`
    (default `simd_block()`; 1 = off) at a cost still ≤ T, and for FLOP/parameter targets ≥ T −
    `align_window` (else a smaller alignment, else none); for a latency target at no more blocked
    FLOPs than the settled pattern. Then a new optimizer stage starts (`restart`, when the next
    epoch is not already a milestone; `restart_at_freeze=False` skips it), λ = `final_lam` (None: keep λ),
    and `on_step` re-zeroes the frozen groups in the parameters and the optimizer's Ŵ / W⁰
    after every step. Best with an lr decay at the freeze epoch (finetune_to_budget's default).

    `rewind="init"` (with the AdamW final phase): at the freeze the whole model is reset to
    `rewind_weights` (a state dict, or a callable returning one: the weights the run started from),
    the frozen groups zeroed and BatchNorm recalibrated, so AdamW trains the chosen structure from the
    dense weights instead of the group lasso's shrunken survivors (all-MiniLM-L6-v2 distillation: the
    median encoder matrix ended at 0.24 of its dense norm).

    `final_optimizer="adamw"` (default): the final phase trains the frozen structure with
    `CosineAdamW` (`final_lr` → 0, weight decay `final_weight_decay`) instead of RAMDA at λ = 0 —
    the peers' fine-tuning routine, on the same architecture; the frozen groups and their Adam
    moments are re-zeroed after every step, and the exported point is the final W. "same": RAMDA
    at λ = `final_lam` as above. digits-resnet from a 99.78% dense model, 30 epochs, freeze at 22,
    seeds 0-2: adamw 99.1-99.8% at 0.3 of the FLOPs (RAMDA 92.4-98.4%, swinging up to 10 points
    from epoch to epoch), 87-95% at 0.1 (RAMDA 71-77%), same widths and ORT speedups.
    """

    def __init__(self, budget: Budget, cost_model: CostModel, groups, cfg, steps_per_epoch: int, *,
                 target: float | None = None, kind: str | None = None, lam0: float | None = None,
                 freeze_epoch: int | None = None, plan_end: float = 0.8, controls_per_epoch: int = 4,
                 gain: float = 4.0, max_factor: float = 2.0, tol: float = 0.02, revive: bool = True,
                 final_lam: float | None = 0.0, restart_at_freeze: bool = True, exact: bool = True,
                 align: int | None = None, align_window: float = 0.05, final_optimizer: str = "adamw",
                 final_lr: float = 1e-3, final_weight_decay: float = 1e-4, rewind: str = "none",
                 rewind_weights=None, latency=None, bn_data=None, log=None):
        self.budget, self.cm, self.groups, self.cfg = budget, cost_model, groups, cfg
        self.kind = kind or ("flops_blocked" if budget.kind == "latency" else budget.kind)
        self.target = float(target if target is not None else budget.target)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.lam0 = float(lam0 if lam0 else ((cfg.lam or 0) if (cfg.lam or 0) > 0 else 1e-4))
        self.freeze_epoch = int(freeze_epoch if freeze_epoch is not None else default_freeze_epoch(cfg))
        if not 1 <= self.freeze_epoch <= cfg.epochs:
            raise UserError(f"freeze epoch {self.freeze_epoch} is outside 1..{cfg.epochs}")
        self.plan_end, self.controls, self.gain = plan_end, max(1, controls_per_epoch), gain
        self.max_factor, self.tol, self.do_revive, self.final_lam = max_factor, tol, revive, final_lam
        self.exact, self.restart_at_freeze = exact, restart_at_freeze
        self.align = simd_block() if align is None else int(align)
        if self.align < 1:
            raise UserError(f"align must be ≥ 1 (1 = no alignment), got {align}")
        self.align_window = align_window
        if final_optimizer not in FINAL_OPTIMIZERS:
            raise UserError(f"--final-optimizer must be {' or '.join(FINAL_OPTIMIZERS)}, got {final_optimizer!r}")
        self.final_optimizer, self.final_lr, self.final_weight_decay = final_optimizer, final_lr, final_weight_decay
        if rewind not in REWINDS:
            raise UserError(f"rewind must be {' or '.join(REWINDS)}, got {rewind!r}")
        if rewind != "none" and final_optimizer != "adamw":
            raise UserError("rewind='init' restarts the survivors from the starting weights for the AdamW final phase; "
                            "it needs final_optimizer='adamw'")
        self.rewind, self.rewind_weights = rewind, rewind_weights
        self.latency, self.bn_data, self.log = latency, bn_data, log or (lambda msg: None)
        self.step = 0
        self.frozen: torch.Tensor | None = None
        self.keeper: ZeroKeeper | None = None
        self.counts = {"removed_by_optimizer": 0, "removed_by_enforcement": 0, "removed_by_alignment": 0, "revived": 0}
        self.history: list[dict] = []
        self.freeze_info: dict = {}
        self._measured_mid = False

    # ---- plan and control

    def planned(self, epochs_done: float) -> float:
        s = min(1.0, epochs_done / max(1e-9, self.plan_end * self.freeze_epoch))
        return self.target + (1 - self.target) * (1 - s) ** 3

    def _lam(self, opt) -> float:
        return float(opt.param_groups[0].get("lam", 0.0))

    def _set_lam(self, opt, lam: float) -> None:
        for g in opt.param_groups:
            g["lam"] = lam

    def _control(self, opt, epochs_done: float) -> dict:
        """Set λ for the plan at `epochs_done` epochs: exactly (critical λ) when the optimizer allows,
        otherwise multiplicatively from the cost gap."""
        p = self.planned(epochs_done)
        crit = critical_lams(opt) if self.exact else None
        if crit is not None:
            lam, c = self._lam_on_plan(crit, p)
            zero_n = int((crit <= lam).sum())
            how = "exact"
        else:
            zero, _ = _structured_zero(opt, self.groups)
            c = float(self.cm.cost(zero, self.kind))
            zero_n = int(zero.sum())
            lam = self._lam(opt)
            if lam <= 0:
                lam = self.lam0
            span = max(1e-6, 1 - self.target)
            if c > p:
                lam *= math.exp(min(self.gain * (c - p) / span, math.log(self.max_factor)))
            elif c < self.target - self.tol:
                lam *= math.exp(max(self.gain * (c - (self.target - self.tol / 2)) / span, -math.log(self.max_factor)))
            how = "multiplicative"
        self._set_lam(opt, lam)
        rec = {"at_epoch": round(epochs_done, 4), "cost": c, "plan": p, "lam": lam, "zero": zero_n, "rule": how}
        self.history.append(rec)
        return rec

    def _lam_on_plan(self, crit: torch.Tensor, plan: float) -> tuple[float, float]:
        """The smallest λ whose zero pattern {g: λ*_g ≤ λ} costs ≤ plan (bisection over sorted λ*)."""
        order = torch.argsort(crit)
        vals = crit[order]

        def cost(k):
            m = torch.zeros(len(crit), dtype=torch.bool)
            m[order[:k]] = True
            return float(self.cm.cost(m, self.kind))

        lo, hi = 0, len(order)
        if cost(hi) > plan:
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(mid) <= plan:
                hi = mid
            else:
                lo = mid + 1
        k = lo
        # ties: every group with λ*_g ≤ λ is zero, so take all groups sharing the k-th value
        if k == 0:
            lam = float(vals[0]) * (1 - 1e-6) if len(vals) else self.lam0
        else:
            lam = float(vals[k - 1]) * (1 + 1e-9)
        lam = max(lam, 1e-12)
        return lam, cost(int((crit <= lam).sum())) if k else cost(0)

    # ---- callbacks for compress.train.finetune

    def on_step(self, opt) -> None:
        self.step += 1
        if self.keeper is not None:
            self.keeper.apply(opt)
            return
        if self.step == 1 and self._lam(opt) <= 0:
            self._set_lam(opt, self.lam0)
        interval = max(1, self.steps_per_epoch // self.controls)
        in_epoch = self.step % self.steps_per_epoch
        if (self.step == 1 or in_epoch and in_epoch % interval == 0) and self.step < self.freeze_epoch * self.steps_per_epoch:
            self._control(opt, self.step / self.steps_per_epoch)

    def on_epoch(self, state: dict) -> dict:
        """λ control in the sparsity phase; at the freeze epoch the freeze, and with
        `final_optimizer="adamw"` the switch: state["optimizer"] becomes the final phase's optimizer."""
        opt, epoch = state["optimizer"], int(state["epoch"])
        trained_by = type(opt).__name__
        self.step = (epoch + 1) * self.steps_per_epoch
        lam_used = self._lam(opt)
        if self.keeper is None and epoch + 1 < self.freeze_epoch:
            rec = self._control(opt, float(epoch + 1))
            phase = "sparsity"
            if self.latency is not None and not self._measured_mid and epoch + 1 >= self.plan_end * self.freeze_epoch:
                # the plan has reached the target: measure the pattern training converged to, refit, remap
                self._measured_mid = True
                zero, _ = _structured_zero(opt, self.groups)
                self.latency.measure(zero, tag=f"structured point, epoch {epoch + 1}")
                self.latency._refit()
                a, b = self.latency.fit
                self.target = float(min(max((self.budget.latency_ms / self.latency.dense_ms - a) / max(b, 1e-6),
                                            self.latency.min_point["flops_blocked"]), 0.99))
        else:
            if self.keeper is None:
                self.freeze(opt, state["model"], state.get("config"), epoch)
                if self.final_optimizer == "adamw":
                    opt = state["optimizer"] = self.make_final_optimizer(state["model"])
            rec = None
            phase = "final"
        zero, _ = _structured_zero(opt, self.groups)
        if self.frozen is not None:
            zero = zero | self.frozen  # revived groups' Ŵ is still zero until the next step
        out = {"cost": float(self.cm.cost(zero, self.kind)), "cost_flops": float(self.cm.cost(zero, "flops")),
               "cost_params": float(self.cm.cost(zero, "params")), "target": self.target, "phase": phase,
               "lam": lam_used, "lam_next": self._lam(opt), "groups_zero": int(zero.sum()), "optimizer": trained_by,
               **self.counts}
        if rec is not None:
            out["plan"] = rec["plan"]
        return out

    def make_final_optimizer(self, model) -> CosineAdamW:
        """The final phase's AdamW over every trainable parameter, its cosine spanning the epochs after
        the freeze (also what a resumed run rebuilds before loading the checkpoint's state)."""
        steps = (self.cfg.epochs - self.freeze_epoch) * self.steps_per_epoch
        return CosineAdamW([p for p in model.parameters() if p.requires_grad], lr=self.final_lr,
                           total_steps=steps, weight_decay=self.final_weight_decay)

    # ---- freeze: commit, enforce or revive, keep zero

    @torch.no_grad()
    def freeze(self, opt, model, cfg=None, epoch: int | None = None) -> dict:
        from .groups import group_norms

        zero, norms = _structured_zero(opt, self.groups)
        iterate_norms = group_norms(self.groups).cpu()  # W (RAMDA: the averaged iterate) before committing
        n_opt = int(zero.sum())
        c0 = float(self.cm.cost(zero, self.kind))
        mask, added = enforce(self.cm, zero, norms, self.kind, self.target)
        if self.do_revive and not bool(added.any()) and c0 < self.target - self.tol and bool((iterate_norms[zero] > 0).any()):
            mask, _ = revive(self.cm, zero, torch.where(zero, iterate_norms, torch.zeros_like(iterate_norms)),
                             self.kind, self.target)
        info = {"epoch": None if epoch is None else epoch + 1, "cost_optimizer": c0, "zero_optimizer": n_opt,
                "lam_at_freeze": self._lam(opt)}
        if self.latency is not None:
            mask, info["latency"] = self.latency.settle(mask, norms, self)
        pre = mask  # the pattern before alignment (what the alignment removed is counted apart)
        if self.align > 1:
            if self.latency is None:  # FLOP/param target: aligned and still in [T − window, T]
                target, floor = self.target, self.target - self.align_window
            else:  # aligned widths never cost more blocked FLOPs than the settled pattern
                target, floor = float(self.cm.cost(mask, self.kind)), None
            mask, info["alignment"] = align_widths(self.cm, self.groups, mask, norms, iterate_norms, self.kind,
                                                   target, self.align, floor=floor)
        added, revived = mask & ~zero, zero & ~mask
        # W ← Ŵ, except revived groups, which keep the iterate's values so they can train again
        saved = None
        if bool(revived.any()):
            saved = [(t, s.dim, torch.tensor(s.indices, device=t.device), t.detach().index_select(s.dim, torch.tensor(s.indices, device=t.device)).clone())
                     for i in torch.nonzero(revived).flatten().tolist()
                     for s, t in zip(self.groups[i].slices, self.groups[i].tensors)]
        if hasattr(opt, "commit_structured_point"):
            opt.commit_structured_point()
        for t, d, ix, vals in saved or []:
            t.detach().index_copy_(d, ix, vals)
        if self.rewind == "init":  # in place (load_state_dict copies), so the groups' tensors stay bound
            w = self.rewind_weights() if callable(self.rewind_weights) else self.rewind_weights
            if w is None:
                raise UserError("rewind='init' needs the starting weights (rewind_weights)")
            dev = next(model.parameters()).device
            model.load_state_dict({k: v.to(dev) for k, v in w.items()})
            info["rewound_to"] = "init"
        self.keeper = ZeroKeeper(self.groups, mask)
        self.keeper.apply(opt)
        self.frozen = mask
        milestones = getattr(cfg, "milestones", None) or []
        if self.restart_at_freeze and hasattr(opt, "restart") and epoch is not None and (epoch + 1) not in milestones:
            opt.restart()  # the final phase starts a clean stage from the committed point
        if self.final_lam is not None:  # None: survivors keep the λ they were trained with
            self._set_lam(opt, self.final_lam)
        if self.bn_data is not None:
            from .train import recalibrate_batchnorm

            recalibrate_batchnorm(model, self.bn_data, next(model.parameters()).device)
        self.counts = {"removed_by_optimizer": int((zero & mask).sum()),
                       "removed_by_enforcement": int((added & pre).sum()),
                       "removed_by_alignment": int((added & ~pre).sum()), "revived": int(revived.sum())}
        info.update(self.counts, cost_frozen=float(self.cm.cost(mask, self.kind)), groups_frozen=int(mask.sum()))
        self.freeze_info = info
        self.log(f"budget: froze {int(mask.sum())} zero groups at epoch {info['epoch']} — {self.counts['removed_by_optimizer']} "
                 f"by the optimizer, {self.counts['removed_by_enforcement']} by enforcement, "
                 f"{self.counts['removed_by_alignment']} by alignment to {info.get('alignment', {}).get('align', 1)}, "
                 f"{self.counts['revived']} revived; "
                 f"{self.kind} {info['cost_frozen']:.4f} (target {self.target:.4f})")
        return info

    def state(self) -> dict:
        return {"target": self.target, "kind": self.kind, "freeze_epoch": self.freeze_epoch, "counts": self.counts,
                "frozen": None if self.frozen is None else torch.nonzero(self.frozen).flatten().tolist(),
                "freeze_info": self.freeze_info, "history": self.history}


FINAL_OPTIMIZERS = ("adamw", "same")
REWINDS = ("none", "init")


def default_freeze_epoch(cfg) -> int:
    """Where the final phase starts: the last learning-rate milestone when it leaves 10–40% of
    the epochs (RAMDA restarts there anyway), otherwise the last quarter."""
    e = cfg.epochs
    ms = [m for m in (cfg.milestones or []) if 0.6 * e <= m <= 0.9 * e]
    if ms:
        return max(ms)
    return max(1, e - max(1, round(0.25 * e))) if e > 1 else 1


# --------------------------------------------------------------------------- latency


class LatencyModel:
    """Latency of a zero pattern, predicted from measurements on this machine.

    Each measurement zeroes the pattern on a copy of the model, extracts it, exports ONNX and
    times it with ONNX Runtime interleaved with the dense model (`compress.benchmark`), so a
    point is a *ratio* to the dense latency measured in the same breath and machine drift
    cancels. `calibrate` measures magnitude-pruned patterns (weakest groups per unit of FLOPs
    first, like the regularizer) at a few FLOP fractions plus the smallest valid model, and
    fits latency/dense ≈ a + b·FLOP fraction by least squares; `flops_for(T)` inverts it.
    """

    def __init__(self, model: nn.Module, groups, example_inputs, cost_model: CostModel, *, batch: int = 1,
                 threads: int | None = None, workdir=None, time_budget_s: float = 1.5, log=None):
        import tempfile

        self.model = copy.deepcopy(model).cpu().eval()
        self.groups = groups
        self.example = example_inputs
        self.cm = cost_model
        self.batch, self.threads, self.time_budget_s = batch, threads, time_budget_s
        self._tmp = tempfile.TemporaryDirectory(prefix="compress-latency-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.points: list[dict] = []
        self.fit: tuple[float, float] | None = None
        self.fit_calibration: tuple[float, float] | None = None
        self.log = log or (lambda msg: None)
        self._dense_onnx = None

    def _export(self, model, name: str) -> Path:
        from .export import export_onnx

        path = self.workdir / f"{name}.onnx"
        args, kwargs = _as_args(self.example)
        if kwargs:
            raise UserError("a latency target needs a model with positional tensor inputs (ONNX export)")
        export_onnx(model, args if len(args) > 1 else args[0], path, verify=False)
        return path

    def _small(self, mask):
        from .extract import extract
        from .groups import GroupList, bind_groups

        work = copy.deepcopy(self.model)
        gl = bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in self.groups]), work)
        ZeroKeeper(gl, mask).apply()
        small, _ = extract(work, gl, self.example)
        return small

    def measure(self, mask, model: nn.Module | None = None, tag: str = "point") -> dict:
        """Extract (or take `model`, already small), export, benchmark against the dense model."""
        from .bench import benchmark

        if self._dense_onnx is None:
            self._dense_onnx = self._export(self.model, "dense")
        small = model if model is not None else self._small(mask)
        path = self._export(small, f"candidate{len(self.points)}")
        res = benchmark(self._dense_onnx, path, batch_sizes=(self.batch,), threads=(self.threads,),
                        time_budget_s=self.time_budget_s)
        row = res["results"][0]
        mask = torch.as_tensor(mask, dtype=torch.bool)
        pt = {"tag": tag, "flops": float(self.cm.cost(mask, "flops")), "params": float(self.cm.cost(mask, "params")),
              "flops_blocked": float(self.cm.cost(mask, "flops_blocked")),
              "latency_ms": row["compressed"]["median_ms"], "dense_ms": row["dense"]["median_ms"],
              "ratio": row["compressed"]["median_ms"] / row["dense"]["median_ms"],
              "spread": row["compressed"]["spread"], "threads": row["threads"], "batch": row["batch"]}
        self.points.append(pt)
        self.log(f"latency: {tag}: FLOPs {pt['flops']:.3f} → {pt['latency_ms']:.3f} ms (dense {pt['dense_ms']:.3f} ms)")
        return pt

    @property
    def dense_ms(self) -> float:
        return float(torch.tensor([p["dense_ms"] for p in self.points]).median())

    def _fit(self, points) -> tuple[float, float]:
        f = torch.tensor([1.0] + [p["flops_blocked"] for p in points], dtype=torch.float64)
        r = torch.tensor([1.0] + [p["ratio"] for p in points], dtype=torch.float64)
        A = torch.stack([torch.ones_like(f), f], 1)
        sol = torch.linalg.lstsq(A, r[:, None]).solution.flatten()
        return float(sol[0]), float(sol[1])

    def _refit(self) -> None:
        """Least squares over every measured point except the smallest model (far from any budget)."""
        self.fit = self._fit([p for p in self.points if p["tag"] != "smallest valid model"])

    def calibrate(self, fractions=(0.75, 0.5, 0.3), target_ms: float | None = None) -> None:
        """Measure the smallest valid model (UserError right away if `target_ms` is below it), then
        magnitude patterns at `fractions` of the blocked FLOPs, and fit."""
        from .groups import group_norms

        norms = group_norms(self.groups).cpu()
        none = torch.zeros(self.cm.n_groups, dtype=torch.bool)
        floor = torch.ones(self.cm.n_groups, dtype=torch.bool)
        self.min_point = self.measure(floor, tag="smallest valid model")
        if target_ms is not None:
            self.check_target(target_ms)
        for f in fractions:
            if f > self.min_point["flops_blocked"]:
                mask, _ = enforce(self.cm, none, norms, "flops_blocked", f)
                self.measure(mask, tag=f"magnitude {f:g}")
        self._refit()
        self.fit_calibration = self.fit

    def predict(self, mask, fit=None) -> float:
        a, b = fit or self.fit
        return self.dense_ms * (a + b * float(self.cm.cost(torch.as_tensor(mask, dtype=torch.bool), "flops_blocked")))

    def flops_for(self, target_ms: float) -> float:
        """The blocked-FLOP fraction whose predicted latency is `target_ms`; UserError if out of reach."""
        self.check_target(target_ms)
        a, b = self.fit
        f = (target_ms / self.dense_ms - a) / b if b > 0 else self.min_point["flops_blocked"]
        return float(min(max(f, self.min_point["flops_blocked"]), 0.99))

    def check_target(self, target_ms: float) -> None:
        lo = self.min_point["latency_ms"]
        if target_ms < lo:
            raise UserError(f"--target-latency-ms {target_ms:g} is below what the smallest valid model reaches: "
                            f"{lo:.3f} ms measured (batch {self.batch}, every removable group removed)")
        if target_ms >= self.dense_ms:
            raise UserError(f"--target-latency-ms {target_ms:g} is not below the dense model's {self.dense_ms:.3f} ms "
                            f"(batch {self.batch}): nothing to compress")

    def latency_of(self, pt: dict) -> float:
        """A point's latency on the session's scale: its ratio to the dense model timed in the same
        interleaved run × the dense model's median over all runs (load drift cancels)."""
        return pt["ratio"] * self.dense_ms

    def settle(self, mask, norms, ctl: "BudgetController", max_probes: int = 7):
        """At the freeze, by measurement: if the frozen pattern is slower than the target, remove
        the weakest groups (per unit of blocked FLOPs) in the fewest number that measures ≤ target,
        found by bisection over the ranking (each probe: extract, export, benchmark). Returns (mask, info)."""
        target_ms = ctl.budget.latency_ms
        probes = []

        def probe(m, tag):
            pred = self.predict(m)
            pt = self.measure(m, tag=tag)
            probes.append({"groups": int(m.sum()), "flops_blocked": pt["flops_blocked"], "predicted_ms": pred,
                           "measured_ms": self.latency_of(pt), "raw_ms": pt["latency_ms"]})
            return self.latency_of(pt) <= target_ms

        if probe(mask, "frozen pattern"):
            return mask, {"probes": probes}
        zero = mask.clone()
        sav = self.cm.savings(zero, "flops_blocked")
        score = norms.double() / sav.clamp_min(1e-300)
        score[zero | (sav <= 0)] = math.inf
        order = torch.argsort(score, stable=True)[: int((~zero).sum())]

        def prefix(k):
            m = zero.clone()
            m[order[:k]] = True
            return m

        # a first guess from the fitted model, pushed down until it measures ≤ target
        self._refit()
        a, b = self.fit
        guess = (target_ms / self.dense_ms - a) / max(b, 1e-6)
        lo, hi = 0, None
        kl, kh = 0, len(order)  # the fewest removals the model says reach the guess (cost falls with k)
        while kl < kh:
            mid = (kl + kh) // 2
            if self.cm.cost(prefix(mid), "flops_blocked") <= guess:
                kh = mid
            else:
                kl = mid + 1
        k = min(max(kl, 1), len(order))
        while len(probes) < max_probes:
            if probe(prefix(k), f"freeze probe, {k} more groups"):
                hi = k
                break
            lo = k
            if k == len(order):
                raise UserError(f"--target-latency-ms {target_ms:g} is not reached even with every group removed")
            k = min(len(order), 2 * k)
        if hi is None:
            hi = len(order)  # probes exhausted: the smallest model, measured at calibration to be fast enough
        while hi - lo > max(1, len(order) // 64) and len(probes) < max_probes:
            mid = (lo + hi) // 2
            if probe(prefix(mid), f"freeze probe, {mid} more groups"):
                hi = mid
            else:
                lo = mid
        self._refit()
        ctl.target = float(self.cm.cost(prefix(hi), "flops_blocked"))
        return prefix(hi), {"probes": probes}

    def table(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, "block": self.cm.block,
                "fit": {"a": self.fit[0], "b": self.fit[1]} if self.fit else None,
                "fit_calibration": {"a": self.fit_calibration[0], "b": self.fit_calibration[1]} if self.fit_calibration else None,
                "dense_ms": self.dense_ms if self.points else None, "points": self.points,
                "model": "latency/dense ≈ a + b·(blocked FLOP fraction), least squares over the measured points"}


# --------------------------------------------------------------------------- the API


@dataclass
class BudgetRunResult:
    """`compress.train.RunResult` fields plus `budget`: the summary also saved as out/budget.json."""

    out: Path
    metrics: list
    model: nn.Module | None
    optimizer: object
    groups: list | None
    budget: dict


BUDGET_FILES = {"summary": "budget.json", "state": "budget_state.json"}


def finetune_to_budget(model: nn.Module, train_data, eval_data, example_inputs, out, config=None,
                       budget: Budget | None = None, *, groups=None, resume: bool = False,
                       controller: dict | None = None, align: int | None = None,
                       final_optimizer: str | None = None, rewind: str | None = None, measure_latency: bool | None = None,
                       latency_calibration=(0.75, 0.5, 0.3), latency_time_budget_s: float = 1.5,
                       console=None, **finetune_kwargs) -> BudgetRunResult:
    """Fine-tune `model` so that the exported model meets `budget`; λ is found by the controller.

    `config.lam` (if > 0) is only λ's starting value; `config.milestones=None` means one lr decay
    at 3/4 of the epochs, where the final phase (frozen structure) begins (`budget_config`). `controller`: keyword
    arguments for `BudgetController` (freeze_epoch, plan_end, gain, tol, revive, final_lr, ...).
    `final_optimizer`: "adamw" or "same" (`BudgetController`; None: its default). `rewind`: "init" resets
    the model to its starting weights (out/init.safetensors) at the freeze, before the AdamW phase. `align`: at the freeze every
    channel/neuron width keeps a multiple of this many groups (`align_widths`; None: `simd_block()`,
    1: off), so the exported model runs on ONNX Runtime's blocked kernels. Other keyword
    arguments go to `compress.train.finetune` (force, init_weights, run_info, loss_fn, callbacks,
    progress, ...). After training the zero groups are extracted and
    counted for real, a latency target (or `measure_latency=True`) is measured with ONNX
    Runtime, and out/budget.json states target, achieved and dense cost side by side.
    """
    import json

    from rich.console import Console

    from . import checkpoint as ckpt
    from .cost import count_flops, count_params
    from .extract import extract
    from .groups import find_groups, load_groups, zero_mask
    from .train import RUN_FILES, TrainConfig, _num_batches, _to, evaluate, finetune, recalibrate_batchnorm, save_weights

    console = console or Console()
    out = Path(out)
    restore = None
    if resume:
        cfg_path = out / RUN_FILES["config"]
        if not cfg_path.is_file():
            raise UserError(f"{out} is not a run directory (no {RUN_FILES['config']}); nothing to resume")
        saved = json.loads(cfg_path.read_text())
        if "budget" not in saved:
            raise UserError(f"{out} was not trained to a budget; resume it with compress finetune --resume")
        budget = Budget(**saved["budget"])
        cfg = TrainConfig(**saved["train"])
        # runs saved before the option existed trained their final phase with the same optimizer
        controller = {"final_optimizer": "same", **saved.get("budget_controller", {}), **(controller or {})}
        groups = load_groups(out / RUN_FILES["groups"], model)
        state_path = out / BUDGET_FILES["state"]
        restore = json.loads(state_path.read_text()) if state_path.is_file() else None
        info = ckpt.load_checkpoint(out / RUN_FILES["checkpoint"])["info"]
    else:
        if budget is None:
            raise UserError("finetune_to_budget needs a budget, e.g. Budget(flops=0.5)")
        cfg = budget_config(config or TrainConfig())
        info = None
    if budget.kind == "latency" and int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("a latency target is measured on this machine and cannot be used under torchrun; "
                        "use --target-flops or --target-params for data-parallel runs")
    if cfg.optimizer == "adamw":
        raise UserError("a budget needs a group-sparse optimizer (ramda, rmda, proxsgd or proxadam); adamw trains dense models")
    lam0 = (controller or {}).get("lam0") or (cfg.lam if cfg.lam > 0 else 1e-4)
    if not resume:
        cfg = dataclasses.replace(cfg, lam=lam0)
    example = _to(example_inputs, torch.device("cpu"))
    model_cpu_example = example
    if groups is None:
        groups = find_groups(model, model_cpu_example, weight=cfg.group_weight)
    cm = CostModel(model, groups, model_cpu_example)
    budget.check_reachable(cm)
    dense = {"flops": cm.dense_flops, "params": cm.dense_params}

    latency = None
    target = None
    if budget.kind == "latency" or measure_latency:
        latency = LatencyModel(model, groups, model_cpu_example, cm, batch=budget.batch, threads=budget.threads,
                               time_budget_s=latency_time_budget_s, log=console.print)
        if restore and restore.get("latency"):
            lt = restore["latency"]
            latency.points, latency.fit = lt["points"], tuple(lt["fit"])
            latency.fit_calibration = tuple(lt["fit_calibration"]) if lt.get("fit_calibration") else None
            latency.min_point = lt["min_point"]
        elif budget.kind == "latency":
            with console.status("measuring latency at calibration patterns (extract → ONNX → ONNX Runtime)"):
                latency.calibrate(latency_calibration, target_ms=budget.latency_ms)
        if budget.kind == "latency":
            target = restore["target"] if restore else latency.flops_for(budget.latency_ms)
            console.print(f"budget: {budget.describe()} → blocked-FLOP fraction {target:.4f} "
                          f"(fit latency/dense = {latency.fit[0]:.3f} + {latency.fit[1]:.3f}·blocked FLOPs)")

    ctl_kw = {k: v for k, v in (controller or {}).items() if k != "lam0"}
    if align is not None:
        ctl_kw["align"] = align
    if final_optimizer is not None:
        ctl_kw["final_optimizer"] = final_optimizer
    if rewind is not None:
        ctl_kw["rewind"] = rewind

    def start_weights():  # what finetune saved before its first step (also there when resuming before the freeze)
        from safetensors.torch import load_file

        return load_file(out / RUN_FILES["init"])

    ctl = BudgetController(budget, cm, groups, cfg, _num_batches(train_data, cfg.batch_size), target=target,
                           lam0=lam0, latency=latency if budget.kind == "latency" else None,
                           bn_data=train_data, log=console.print, rewind_weights=start_weights, **ctl_kw)
    if restore:
        ctl.counts, ctl.history, ctl.freeze_info = restore["counts"], restore["history"], restore["freeze_info"]
        ctl.target = restore["target"]
        if restore.get("frozen") is not None and restore["freeze_info"].get("epoch") and info["epoch"] >= restore["freeze_info"]["epoch"]:
            mask = torch.zeros(len(groups), dtype=torch.bool)
            mask[restore["frozen"]] = True
            ctl.frozen, ctl.keeper = mask, ZeroKeeper(groups, mask)
        ctl.step = info["epoch"] * ctl.steps_per_epoch + info["batch"]
    if ctl.keeper is not None and ctl.final_optimizer == "adamw":  # the checkpoint holds the final phase's AdamW
        finetune_kwargs["build_optimizer"] = lambda cfg, model, groups: ctl.make_final_optimizer(model)

    def save_state(st):
        extra = ctl.on_epoch(st)
        s = ctl.state()
        if latency is not None and latency.fit is not None:
            s["latency"] = {"points": latency.points, "fit": list(latency.fit), "min_point": latency.min_point,
                            "fit_calibration": list(latency.fit_calibration) if latency.fit_calibration else None}
        if out.is_dir():
            atomic_write_json(out / BUDGET_FILES["state"], s)
        return extra

    user_epoch = list(finetune_kwargs.pop("epoch_callbacks", ()))
    user_step = list(finetune_kwargs.pop("step_callbacks", ()))
    run_info = dict(finetune_kwargs.pop("run_info", None) or {})
    run_info["budget"] = dataclasses.asdict(budget)
    run_info["budget_controller"] = {**ctl_kw, "freeze_epoch": ctl.freeze_epoch, "lam0": lam0, "align": ctl.align,
                                     "final_optimizer": ctl.final_optimizer, "rewind": ctl.rewind}
    t0 = time.perf_counter()
    result = finetune(model, train_data, eval_data, example_inputs, out, None if resume else cfg, groups=groups,
                      resume=resume, run_info=run_info, epoch_callbacks=[save_state, *user_epoch],
                      step_callbacks=[ctl.on_step, *user_step], console=console, **finetune_kwargs)
    train_s = time.perf_counter() - t0
    model = result.model
    device = next(model.parameters()).device

    # ---- the promise: the exported point holds the target
    final_zero = zero_mask(groups).cpu()
    post_hoc = 0
    if ctl.frozen is None:  # training ended before the freeze epoch (e.g. interrupted schedule)
        ctl.freeze(result.optimizer, model, cfg, cfg.epochs - 1)
        final_zero = zero_mask(groups).cpu()
    if float(cm.cost(final_zero, ctl.kind)) > ctl.target:
        mask, added = enforce(cm, final_zero, torch.as_tensor(
            __import__("compress.groups", fromlist=["group_norms"]).group_norms(groups)).cpu(), ctl.kind, ctl.target)
        ZeroKeeper(groups, mask).apply()
        post_hoc = int(added.sum())
        final_zero = zero_mask(groups).cpu()
    acc = {}
    # finetune recalibrates BatchNorm when it commits RAMDA's Ŵ; the AdamW phase ends on W (its running
    # statistics), and a post-hoc removal changes the point: recalibrate like every epoch's evaluation did
    if post_hoc or isinstance(result.optimizer, CosineAdamW):
        recalibrate_batchnorm(model, train_data, device)
        save_weights(out / RUN_FILES["weights"], model)

    was = model.training
    small, rep = extract(model.cpu(), groups, model_cpu_example)
    model.to(device).train(was)
    achieved = {"flops": rep["flops_after"], "params": rep["params_after"],
                "flops_fraction": rep["flops_after"] / dense["flops"], "params_fraction": rep["params_after"] / dense["params"],
                "flops_predicted": cm.flops(final_zero), "params_predicted": cm.params(final_zero)}
    if eval_data is not None:
        acc["accuracy"] = evaluate(small, eval_data, torch.device("cpu"))["accuracy"]
    lat = None
    if latency is not None:
        predicted = latency.predict(final_zero) if latency.fit else None
        predicted_cal = latency.predict(final_zero, latency.fit_calibration) if latency.fit_calibration else None
        with console.status("measuring the latency of the compressed model"):
            pt = latency.measure(final_zero, model=small, tag="final model")
        meas = latency.latency_of(pt)
        lat = {"measured_ms": meas, "measured_raw_ms": pt["latency_ms"], "dense_ms": latency.dense_ms,
               "dense_raw_ms": pt["dense_ms"], "ratio_to_dense": pt["ratio"], "target_ms": budget.latency_ms,
               "batch": budget.batch, "threads": pt["threads"],
               "measured_note": "ratio to the dense model timed interleaved in the same run × the dense model's "
                                "median latency over all runs of this session",
               # from the fit to the calibration patterns only (before training): the model's own prediction
               "predicted_ms": predicted_cal,
               "prediction_error": None if predicted_cal is None else (predicted_cal - meas) / meas,
               # refit on every pattern measured before the final export, incl. the freeze probes (one of
               # which has the final architecture): a consistency check of the measurements, not a model
               "predicted_ms_refit": predicted,
               "prediction_error_refit": None if predicted is None else (predicted - meas) / meas}
        if latency.fit:
            lat["table"] = latency.table()
            atomic_write_json(out / "latency.json", latency.table())
        achieved["latency_ms"] = meas
    summary = budget_summary(budget, ctl, dense, achieved, acc, result.metrics, lat, post_hoc, train_s, cfg)
    atomic_write_json(out / BUDGET_FILES["summary"], summary)
    return BudgetRunResult(out=result.out, metrics=result.metrics, model=model, optimizer=result.optimizer,
                           groups=groups, budget=summary)


def budget_config(cfg) -> "TrainConfig":
    """`cfg` resolved for a budget run (the CLI and the API share this): with `milestones=None` and a
    step schedule, one lr decay where the final phase starts (3/4 of the epochs) instead of the
    plain runs' two — the frozen structure then trains at lr·γ and settles (digits-resnet at 0.5
    FLOPs: 0.993 vs 0.891 with no decay, same dense start)."""
    if cfg.milestones is None and cfg.schedule == "step" and cfg.epochs >= 4:
        cfg = dataclasses.replace(cfg, milestones=[round(0.75 * cfg.epochs)])
    cfg = cfg.resolved()
    cfg.validate()
    return cfg


def budget_summary(budget: Budget, ctl: BudgetController, dense: dict, achieved: dict, accuracy: dict,
                   metrics: list, latency: dict | None, post_hoc: int, train_seconds: float, cfg) -> dict:
    """Target, achieved and dense cost side by side, how λ ended, and who removed which groups."""
    kind = budget.kind
    s = {
        "target": {"kind": kind, "value": budget.target, "describe": budget.describe(),
                   "controlled_as": {"kind": ctl.kind, "fraction": ctl.target}},
        "dense": dense,
        "achieved": achieved,
        "met": (achieved["latency_ms"] <= budget.target if kind == "latency"
                else achieved[f"{kind}_fraction"] <= budget.target),
        **accuracy,
        "lam_final": ctl.freeze_info.get("lam_at_freeze"),  # λ that produced the frozen pattern
        "lam_final_phase": ctl.final_lam,
        "groups_total": ctl.cm.n_groups,
        "removed_by_optimizer": ctl.counts["removed_by_optimizer"],
        "removed_by_enforcement": ctl.counts["removed_by_enforcement"] + post_hoc,
        "removed_by_alignment": ctl.counts.get("removed_by_alignment", 0),
        "align": ctl.freeze_info.get("alignment", {}).get("align", 1),
        "revived": ctl.counts["revived"],
        "removed_post_hoc_without_finetuning": post_hoc,
        "freeze": ctl.freeze_info,
        "group_weight": cfg.group_weight,
        "optimizer": cfg.optimizer,
        "final_optimizer": ctl.final_optimizer,
        "rewind": ctl.rewind,
        "epochs": cfg.epochs,
        "train_seconds": train_seconds,
        "control_history": ctl.history,
    }
    if latency is not None:
        s["latency"] = latency
    return s
