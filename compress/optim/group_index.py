"""Groups seen from the optimizer's side: one index per parameter, so per-group reductions
are a few tensor operations per parameter and never a Python loop over groups.

Each parameter is a 3-D view [A, n, B] where n is the size along its grouped dim, and a
LongTensor maps each of the n indices to a group id (-1: ungrouped). A per-group reduction
is "sum over dims 0 and 2, index_add into a vector of groups".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- the index


@dataclass
class ParamEntry:
    """How one parameter is grouped: `dim` (None: not at all) and a group id per index along it."""

    dim: int | None
    shape3: tuple[int, int, int]  # [A, n, B] view: n = size along dim
    gid: Tensor  # [n] long, group id or -1
    gid_ext: Tensor  # [n] long, -1 replaced by n_groups (a dummy slot)
    has_groups: bool


class GroupIndex:
    """Per-parameter map "index along the grouped dim -> group id", built once.

    `params`: the tensors the optimizer updates, in a fixed order. `groups`: None (every
    parameter with >= 2 dims is grouped by its dim-0 rows with weight sqrt(row size);
    1-D parameters are not regularized) or a list of bound `compress.groups.Group`
    (their `.tensors` must be among `params`, matched by identity).
    """

    def __init__(self, params: Sequence[Tensor], groups=None):
        self.params = list(params)
        pos = {id(p): k for k, p in enumerate(self.params)}
        if len(pos) != len(self.params):
            raise ValueError("a parameter appears twice in the optimizer")
        if groups is None:
            dims, gid_lists, weights, sizes, self.names = self._row_groups()
        else:
            dims, gid_lists, weights, sizes, self.names = self._bound_groups(groups, pos)
        self.n_groups = len(weights)
        device = self.params[0].device if self.params else torch.device("cpu")
        for p in self.params:
            if p.device != device:
                raise ValueError("all parameters of a prox optimizer must be on one device")
        self.device = device
        self.weights = torch.tensor(weights, dtype=torch.float64, device=device)
        self.sizes = torch.tensor(sizes, dtype=torch.float64, device=device)
        if bool((self.weights < 0).any()):
            raise ValueError("group weights must be >= 0")
        entries = []
        for k, p in enumerate(self.params):
            d = dims[k]
            if d is None:
                entries.append((None, (1, 1, p.numel()), torch.full((1,), -1, dtype=torch.long)))
            else:
                entries.append((d, (math.prod(p.shape[:d]), p.shape[d], math.prod(p.shape[d + 1 :])), gid_lists[k]))
        self._set_entries(entries)

    def _row_groups(self) -> tuple:
        """Default grouping: every parameter with >= 2 dims by its dim-0 rows, weight sqrt(row size)."""
        dims: list[int | None] = [None] * len(self.params)
        gid_lists: list[Tensor | None] = [None] * len(self.params)
        weights: list[float] = []
        sizes: list[int] = []
        names: list[str] = []
        for k, p in enumerate(self.params):
            if p.dim() < 2:
                continue
            n = p.shape[0]
            dims[k] = 0
            gid_lists[k] = torch.arange(len(weights), len(weights) + n)
            row = p.numel() // max(n, 1)
            weights += [math.sqrt(row)] * n
            sizes += [row] * n
            names += [f"param{k}[{i}]" for i in range(n)]
        return dims, gid_lists, weights, sizes, names

    def _bound_groups(self, groups, pos: dict) -> tuple:
        """(dims, group id per index, weights, sizes, names) of bound groups, checked disjoint and in range."""
        dims: list[int | None] = [None] * len(self.params)
        gid_lists: list[Tensor | None] = [None] * len(self.params)
        weights, sizes, names = [], [], []
        for gi, g in enumerate(groups):
            tensors = getattr(g, "tensors", None)
            name = getattr(g, "name", f"group{gi}")
            if not tensors or len(tensors) != len(g.slices):
                raise ValueError(f"group {name} is not bound to a model; call compress.structure.group.bind_groups")
            size = 0
            for s, t in zip(g.slices, tensors):
                k = pos.get(id(t))
                if k is None:
                    raise ValueError(
                        f"group {name}: parameter {s.param!r} is not among the optimizer's parameters "
                        "(pass the same model's parameters, with requires_grad=True)"
                    )
                p = self.params[k]
                if not 0 <= s.dim < p.dim():
                    raise ValueError(
                        f"group {name}: dim {s.dim} does not exist in {s.param!r} of shape {list(p.shape)}"
                    )
                if dims[k] is None:
                    dims[k] = s.dim
                    gid_lists[k] = torch.full((p.shape[s.dim],), -1, dtype=torch.long)
                elif dims[k] != s.dim:
                    raise ValueError(
                        f"parameter {s.param!r} carries groups on dims {dims[k]} and {s.dim}; "
                        "a parameter may be grouped along one dim only"
                    )
                _mark(gid_lists[k], s, p, gi, name, names)
                size += len(s.indices) * (p.numel() // max(p.shape[s.dim], 1))
            weights.append(float(g.weight))
            sizes.append(size)
            names.append(name)
        return dims, gid_lists, weights, sizes, names

    def _set_entries(self, entries) -> None:
        """entries: (dim, [A, n, B], gid [n] with -1 = ungrouped) per parameter."""
        G, device = self.n_groups, self.device
        self.entries: list[ParamEntry] = []
        pair_e, pair_g = [], []
        for k, (d, shape3, gid) in enumerate(entries):
            used = torch.unique(gid[gid >= 0].cpu())
            pair_e.append(torch.full_like(used, k))
            pair_g.append(used)
            gid = gid.to(device)
            self.entries.append(ParamEntry(d, shape3, gid, torch.where(gid < 0, G, gid), bool(used.numel())))
        self.pair_entry = torch.cat(pair_e).to(device) if pair_e else torch.zeros(0, dtype=torch.long, device=device)
        self.pair_group = torch.cat(pair_g).to(device) if pair_g else torch.zeros(0, dtype=torch.long, device=device)
        self.grouped = [k for k, e in enumerate(self.entries) if e.has_groups]
        self._gid_flat = (
            torch.cat([e.gid_ext for e in self.entries])
            if self.entries
            else torch.zeros(0, dtype=torch.long, device=device)
        )
        self._splits = [len(e.gid_ext) for e in self.entries]
        self._gid_cache: dict = {}

    def packed(self, packs: Sequence[Sequence[int]]) -> tuple[GroupIndex, list]:
        """An index for stepping in which each list of parameters in `packs` becomes one flat
        parameter [1, N, 1] with a group id per element (many small tensors, one set of ops).

        Returns (index, layout): layout[j] is ("param", k) or ("pack", i) for the j-th
        entry of the new index (packs after the unpacked parameters, in order).
        """
        out = object.__new__(GroupIndex)
        out.n_groups, out.device, out.weights, out.sizes, out.names = (
            self.n_groups,
            self.device,
            self.weights,
            self.sizes,
            self.names,
        )
        in_pack = {k for pk in packs for k in pk}
        layout = [("param", k) for k in range(len(self.params)) if k not in in_pack]
        entries = [(self.entries[k].dim, self.entries[k].shape3, self.entries[k].gid) for _, k in layout]
        params = [self.params[k] for _, k in layout]
        for i, pk in enumerate(packs):
            ids = []
            for k in pk:
                A, n, B = self.entries[k].shape3
                ids.append(self.entries[k].gid.view(1, n, 1).expand(A, n, B).reshape(-1))
            gid = torch.cat(ids)
            entries.append((0, (1, len(gid), 1), gid))
            params.append(self.params[pk[0]].new_empty(0))  # dtype/device stand-in
            layout.append(("pack", i))
        out.params = params
        out._set_entries(entries)
        return out, layout

    # ---- views and group vectors

    def view3(self, k: int, t: Tensor) -> Tensor:
        """`t` (shaped like parameter k) as the [A, n, B] view its group reductions use."""
        return t.reshape(self.entries[k].shape3)

    def expand(self, k: int, vec: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
        """Per-index values [n] for parameter k from a per-group vector (ungrouped: `fill`)."""
        ext = torch.cat([vec, vec.new_full((1,), fill)])
        return ext[self.entries[k].gid_ext].to(dtype)

    def expand_all(self, vec: Tensor, fill: float, dtypes: Sequence[torch.dtype]) -> list[Tensor]:
        """`expand` for every parameter with one gather (views into one flat vector per dtype)."""
        flat = torch.cat([vec, vec.new_full((1,), fill)])[self._gid_flat]
        by_dtype = {dt: flat.to(dt).split(self._splits) for dt in set(dtypes)}
        return [by_dtype[dt][k] for k, dt in enumerate(dtypes)]

    def sum_rows(self, ks: Sequence[int], rows: Sequence[Tensor]) -> Tensor:
        """Per-group sums (float64 [n_groups]) of per-index rows of parameters `ks`, one index_add."""
        out = torch.zeros(self.n_groups + 1, dtype=torch.float64, device=self.device)
        if ks:
            out.index_add_(0, self._gid_cat(ks), torch.cat(list(rows)).to(torch.float64))
        return out[: self.n_groups]

    def amax_rows(self, ks: Sequence[int], rows: Sequence[Tensor]) -> Tensor:
        out = torch.zeros(self.n_groups + 1, dtype=torch.float64, device=self.device)
        if ks:
            out.scatter_reduce_(0, self._gid_cat(ks), torch.cat(list(rows)).to(torch.float64), reduce="amax")
        return out[: self.n_groups]

    def _gid_cat(self, ks: Sequence[int]) -> Tensor:
        key = tuple(ks)
        hit = self._gid_cache.get(key)
        if hit is None:
            hit = torch.cat([self.entries[k].gid_ext for k in ks])
            if len(self._gid_cache) < 64:
                self._gid_cache[key] = hit
        return hit

    def entries_touching(self, groups_mask: Tensor) -> list[int]:
        """Parameters holding a slice of at least one group in `groups_mask` (vectorized, one sync)."""
        hit = torch.zeros(len(self.entries), dtype=torch.float64, device=self.device)
        hit.index_add_(0, self.pair_entry, groups_mask[self.pair_group].to(torch.float64))
        return torch.nonzero(hit > 0).flatten().tolist()

    def group_sq_norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """Σ x² per group (float64) for tensors aligned with `params`."""
        rows = []
        for k in self.grouped:
            x = self.view3(k, tensors[k].detach()).double()
            rows.append((x * x).sum((0, 2)))
        return self.sum_rows(self.grouped, rows)

    def group_amax(self, tensors: Sequence[Tensor]) -> Tensor:
        """max |x| per group (float64) for tensors aligned with `params`."""
        rows = []
        for k in self.grouped:
            x = self.view3(k, tensors[k].detach()).abs()
            rows.append(x.amax((0, 2)) if x.numel() else x.new_zeros(x.shape[1]))
        return self.amax_rows(self.grouped, rows)

    def sparsity(self, tensors: Sequence[Tensor]) -> tuple[float, float]:
        """(fraction of groups exactly zero, fraction of grouped entries inside zero groups)."""
        if self.n_groups == 0:
            return 0.0, 0.0
        z = self.group_amax(tensors) == 0
        total = float(self.sizes.sum())
        return float(z.double().mean()), (float(self.sizes[z].sum()) / total if total > 0 else 0.0)


# --------------------------------------------------------------------------- kernels


def _mark(gl: Tensor, s, p: Tensor, gi: int, name: str, names: list[str]) -> None:
    """Write group id `gi` at the slice's indices of `gl`; the indices must be in range and still free."""
    idx = torch.as_tensor(list(s.indices), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.shape[s.dim]):
        raise ValueError(f"group {name}: indices out of range for {s.param!r} of shape {list(p.shape)}")
    taken = gl[idx]
    if bool((taken >= 0).any()):
        other = int(taken[taken >= 0][0])
        raise ValueError(
            f"groups {names[other] if other < len(names) else other} and {name} "
            f"overlap in {s.param!r}; groups must be disjoint"
        )
    gl[idx] = gi
