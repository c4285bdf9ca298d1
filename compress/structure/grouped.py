"""Grouped convolutions (ResNeXt, RegNet): the removable structure is one whole conv group.

A conv with groups=G reads its input in G slices of a = C_in/G channels and writes G slices
of b = C_out/G. Removing single output channels would leave C_out not divisible by G, and
torch-pruning's in-channel pruner slices a grouped weight wrongly. Removing conv group j
entirely — its b weight rows and bias, the a input channels it alone reads (so their
producers' rows and BatchNorm entries) and its consumers' b input columns — leaves a grouped
conv with G-1 groups, and is exact once every regularized slice is zero. The group of conv
group j is therefore the union of the per-channel groups (`channel_groups`) of DepGraph's two
pruning groups rooted at the conv's output channels [jb, (j+1)b) and input channels [ja, (j+1)a).
"""

from __future__ import annotations

from compress.structure.channels import channel_groups, writers
from compress.structure.group import Group, Slice

KIND = "convgroup"


def conv_groups(DG, model, conv, name, pnames, attn_linears, out_fns):
    """(groups or None, the conv/linear layers coupled with `conv`'s input or output, reason or None)."""
    if getattr(conv, "transposed", False):
        return None, [], f"transposed grouped convolution {name} (groups={conv.groups})"
    pruner = DG.get_pruner_of_module(conv)
    out_items = list(DG.get_pruning_group(conv, pruner.prune_out_channels, list(range(conv.out_channels))).items)
    in_items = list(DG.get_pruning_group(conv, pruner.prune_in_channels, list(range(conv.in_channels))).items)
    members = list(dict.fromkeys([conv, *writers(DG, out_items), *writers(DG, in_items)]))
    what = f"grouped convolution {name} (groups={conv.groups})"
    if conv in writers(DG, in_items):
        return None, members, f"{what}: its input and output channels are coupled (e.g. a residual add around it)"
    outs, why = channel_groups(DG, model, conv, name, pnames, attn_linears, out_fns, out_items, grouped=conv)
    if why is None:
        ins, why = channel_groups(DG, model, conv, name, pnames, attn_linears, out_fns, in_items, grouped=conv)
    if why is not None:
        return None, members, f"{what}: {why}"
    n_groups, a, b = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    groups = [
        _merge(f"{name}:group{j}", name, [*outs[j * b : (j + 1) * b], *ins[j * a : (j + 1) * a]], order)
        for j in range(n_groups)
    ]
    return groups, members, None


def _merge(gname, layer, parts, order) -> Group:
    """One Group holding every slice (and dependent) of `parts`; a dependent index that is also
    regularized is kept once, as regularized."""

    def union(lists):
        acc: dict[tuple[str, int], set] = {}
        for s in (s for sl in lists for s in sl):
            acc.setdefault((s.param, s.dim), set()).update(s.indices)
        return acc

    sl, dp = union(g.slices for g in parts), union(g.dependents for g in parts)
    for key, ix in sl.items():
        if key in dp:
            dp[key] -= ix

    def slices(acc):
        return [
            Slice(p, d, tuple(sorted(ix)))
            for (p, d), ix in sorted(acc.items(), key=lambda kv: (order.get(kv[0][0], -1), kv[0][1]))
            if ix
        ]

    return Group(name=gname, kind=KIND, layer=layer, slices=slices(sl), dependents=slices(dp))


def conv_group_index(conv, rows) -> tuple[list[int], list[int]]:
    """(conv groups, input channels) that dropping output channels `rows` of `conv` removes."""
    a, b = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    gone = sorted({r // b for r in rows})
    return gone, [j * a + t for j in gone for t in range(a)]
