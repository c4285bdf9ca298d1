"""Group norms and sparsity of the live parameters, through a cached flat index."""

from __future__ import annotations

import torch

from compress.structure.group import GroupList, slice_numel

# --------------------------------------------------------------------------- sparsity


class _Index:
    """Flat per-(param, dim) index tensors: slice positions and the group each belongs to."""

    def __init__(self, groups):
        parts: dict[tuple[str, int], tuple[list, list]] = {}
        self.tensor: dict[str, torch.Tensor] = {}
        sizes = [0] * len(groups)
        for gi, g in enumerate(groups):
            if len(g.tensors) != len(g.slices):
                raise ValueError(f"group {g.name} is not bound to a model; call bind_groups")
            for s, t in zip(g.slices, g.tensors):
                self.tensor[s.param] = t
                pos, gid = parts.setdefault((s.param, s.dim), ([], []))
                pos.extend(s.indices)
                gid.extend([gi] * len(s.indices))
                sizes[gi] += slice_numel(s, t.shape)
        self.parts = {
            k: (torch.tensor(p, dtype=torch.long), torch.tensor(g, dtype=torch.long)) for k, (p, g) in parts.items()
        }
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        self.n = len(groups)

    def reduce(self, groups, how: str) -> torch.Tensor:
        """Per group: max |entry| (how="amax") or sum of squares (how="sq"), in float64."""
        out = torch.zeros(self.n, dtype=torch.float64)
        for (pname, dim), (pos, gid) in self.parts.items():
            t = self.tensor[pname].detach()
            x = t.movedim(dim, 0).reshape(t.shape[dim], -1)
            rows = x.abs().amax(1) if how == "amax" else x.double().pow(2).sum(1)
            vals = rows.to(torch.float64)[pos]
            if how == "amax":
                out.scatter_reduce_(0, gid, vals, reduce="amax")
            else:
                out.index_add_(0, gid, vals)
        return out


def _index(groups) -> _Index:
    idx = getattr(groups, "_index", None) if isinstance(groups, GroupList) else None
    if (
        idx is None
        or idx.n != len(groups)
        or any(idx.tensor.get(s.param) is not t for g in groups[:1] for s, t in zip(g.slices, g.tensors))
    ):
        idx = _Index(groups)
        if isinstance(groups, GroupList):
            groups._index = idx
    return idx


def group_norms(groups) -> torch.Tensor:
    """‖W_g‖₂ of every group on its bound tensors (float64, vectorized over groups)."""
    return _index(groups).reduce(groups, "sq").sqrt()


def zero_mask(groups) -> torch.Tensor:
    """Bool tensor: which groups are exactly zero (every entry == 0, no threshold)."""
    return _index(groups).reduce(groups, "amax") == 0


def zero_groups(groups) -> list[int]:
    """Indices of the groups whose entries are all exactly zero."""
    return torch.nonzero(zero_mask(groups)).flatten().tolist()


def group_sparsity(groups) -> tuple[float, float]:
    """(fraction of groups exactly zero, fraction of grouped entries inside zero groups)."""
    if len(groups) == 0:
        return 0.0, 0.0
    idx = _index(groups)
    z = idx.reduce(groups, "amax") == 0
    return float(z.double().mean()), float(idx.sizes[z].sum() / idx.sizes.sum())
