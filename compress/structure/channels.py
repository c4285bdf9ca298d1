"""Channel groups: a DepGraph root with every coupled slice, kept only where removal is exact."""
from __future__ import annotations

from torch import nn

from compress.structure.group import Group, Slice
from compress.structure.zero_invariance import ZeroAnalysis


def channel_groups(DG, model, root, root_name, pnames, attn_linears, out_fns):
    """Analyse DepGraph's pruning group rooted at `root`'s output channels.

    Returns (groups, None) or (None, reason). The channel is offered only when, with
    the producer slices zeroed, the input every consumer (a conv/linear whose input
    columns DepGraph removes) reads from this channel is provably exactly zero (see
    `ZeroAnalysis`) and no member is a model output. Regularized slices: producers
    and BN/depthwise parameters whose zero output is used; dependents: consumer
    columns, PReLU slopes, and producers whose output only meets a zero factor.
    """
    from torch_pruning import ops

    T = ops.OPTYPE
    pruner = DG.get_pruner_of_module(root)
    n_out = pruner.get_out_channels(root)
    pg = DG.get_pruning_group(root, pruner.prune_out_channels, list(range(n_out)))
    items = list(pg.items)
    nodes_in = {it.dep.target: it for it in items}

    def name_of(node):
        m = node.module
        return DG._module2name.get(m, None) or DG._param_to_name.get(m, None) or str(m)

    def is_out(it):
        p = DG.get_pruner_of_module(it.dep.target.module)
        return p is not None and it.dep.handler == p.prune_out_channels

    producers, consumers = set(), set()
    for it in items:
        node = it.dep.target
        if node.type in (T.CONV, T.LINEAR):
            if isinstance(node.module, nn.modules.conv._ConvNd) and node.module.groups > 1:
                return None, f"grouped convolution {name_of(node)} (groups={node.module.groups}) is coupled"
            if is_out(it):
                if node.module in attn_linears:
                    return None, f"coupled to attention projection {name_of(node)} (heads are grouped separately)"
                producers.add(node)
            else:
                consumers.add(node)
        elif node.type in (T.EMBED, T.PARAMETER):
            producers.add(node)
    if not producers:
        return None, "no layer produces these channels (they come from the network input)"
    for node in nodes_in:
        if node in consumers:
            continue
        if node.type == T.OUTPUT or node.grad_fn in out_fns:
            return None, f"{name_of(node)} is a model output (final classifier or returned features)"
    za = ZeroAnalysis(DG, nodes_in, producers, name_of)
    reasons = []
    for c in sorted(consumers, key=name_of):
        ok, why = za._all(za.data_inputs(c), name_of(c))
        if not ok and why not in reasons:
            reasons.append(why)
    if reasons:  # the most telling one: a normalisation over the channel explains the rest
        return None, next((r for r in reasons if r.startswith("normalised")), reasons[0])

    def used(node):  # its zero output reaches a consumer or keeps a downstream node zero
        return any(o in consumers or (o in nodes_in and za.zero(o)[0]) for o in node.outputs)

    group_slices = [dict() for _ in range(n_out)]  # (param, dim) -> set
    dep_slices = [dict() for _ in range(n_out)]

    def add(target, pname, dim, idxs, roots):
        if pname not in pnames:
            return
        for i, r in zip(idxs, roots):
            target[r].setdefault((pname, dim), set()).add(int(i))

    for it in items:
        node = it.dep.target
        idxs, roots = list(it.idxs), list(it.root_idxs)
        m = node.module
        nm = name_of(node)
        pre = f"{nm}." if nm else ""
        # Role per item, not per node: a layer can write this group's channels (out rows,
        # coupled through a residual add) and read them too (in columns), e.g. the
        # projection of an expand=1 inverted residual with a shortcut.
        if node in consumers and not is_out(it):
            wdim = 0 if getattr(m, "transposed", False) else 1
            add(dep_slices, pre + "weight", wdim, idxs, roots)
        elif node in producers or node.type in (T.BN, T.DEPTHWISE_CONV):
            target = group_slices if (za.zero(node)[0] and used(node)) else dep_slices
            if node.type == T.PARAMETER:
                add(target, nm, node.pruning_dim % m.dim(), idxs, roots)
                continue
            if node.type == T.EMBED:
                add(target, pre + "weight", 1, idxs, roots)
                continue
            wdim = 1 if getattr(m, "transposed", False) else 0
            add(target, pre + "weight", wdim, idxs, roots)
            if getattr(m, "bias", None) is not None:
                add(target, pre + "bias", 0, idxs, roots)
        elif node.type == T.PRELU and m.num_parameters > 1:
            add(dep_slices, pre + "weight", 0, idxs, roots)

    kind = "neuron" if isinstance(root, nn.Linear) else "channel"
    out = []
    for c in range(n_out):
        key = lambda kv: (pnames[kv[0][0]], kv[0][1])  # noqa: E731 - model parameter order
        sl = [Slice(p, d, tuple(sorted(ix))) for (p, d), ix in sorted(group_slices[c].items(), key=key)]
        dp = [Slice(p, d, tuple(sorted(ix))) for (p, d), ix in sorted(dep_slices[c].items(), key=key)]
        if not sl:
            return None, "no parameter slices to regularize"
        out.append(Group(name=f"{root_name}:{c}", kind=kind, layer=root_name, slices=sl, dependents=dp))
    return out, None
