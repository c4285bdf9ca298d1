"""Channel groups: a DepGraph root with every coupled slice, kept only where removal is exact."""

from __future__ import annotations

from torch import nn

from compress.structure.attention import is_conv1d
from compress.structure.group import Group, Slice
from compress.structure.zero_invariance import ZeroAnalysis


def channel_groups(DG, model, root, root_name, pnames, attn_linears, out_fns, items=None, grouped=None):
    """Analyse DepGraph's pruning group rooted at `root`'s output channels (or `items`, a group
    rooted elsewhere: one Group per root index).

    Returns (groups, None) or (None, reason). The channel is offered only when, with
    the producer slices zeroed, the input every consumer (a conv/linear whose input
    columns DepGraph removes) reads from this channel is provably exactly zero (see
    `ZeroAnalysis`) and no member is a model output. Regularized slices: producers
    and BN/depthwise parameters whose zero output is used; dependents: consumer
    columns, PReLU slopes, and producers whose output only meets a zero factor.
    grouped: the grouped convolution whose whole conv groups are being built (`grouped.py`): it
    may take part, and as a reader its columns stay (a conv group keeps its width).
    """
    pruner = DG.get_pruner_of_module(root)
    if items is None:  # find_groups passes the group it already built for this root
        n = pruner.get_out_channels(root)
        items = list(DG.get_pruning_group(root, pruner.prune_out_channels, list(range(n))).items)
    n_out = len(items[0].idxs)  # the root item holds every index of the root
    nodes_in = {it.dep.target: it for it in items}
    producers, consumers, reason = _roles(DG, items, attn_linears, grouped)
    if reason is None:
        reason = _output_reason(DG, nodes_in, producers, consumers, out_fns)
    if reason is not None:
        return None, reason
    za = ZeroAnalysis(DG, nodes_in, producers, lambda node: _name_of(DG, node))
    reason = _nonzero_reason(DG, za, consumers)
    if reason is not None:
        return None, reason
    group_slices, dep_slices, unknown = _slices(DG, items, nodes_in, producers, consumers, za, pnames, n_out, grouped)
    if unknown:
        return None, f"parameter {sorted(unknown)[0]} of the group is not a parameter of the model"
    kind = "neuron" if isinstance(root, nn.Linear) or is_conv1d(root) else "channel"

    def key(kv):  # model parameter order
        return pnames[kv[0][0]][0], kv[0][1]

    out = []
    for c in range(n_out):
        sl = [Slice(p, d, tuple(sorted(ix))) for (p, d), ix in sorted(group_slices[c].items(), key=key)]
        dp = [Slice(p, d, tuple(sorted(ix))) for (p, d), ix in sorted(dep_slices[c].items(), key=key)]
        if not sl:
            return None, "no parameter slices to regularize"
        out.append(Group(name=f"{root_name}:{c}", kind=kind, layer=root_name, slices=sl, dependents=dp))
    return out, None


def _optype():
    from torch_pruning import ops

    return ops.OPTYPE


def _name_of(DG, node) -> str:
    m = node.module
    return DG._module2name.get(m, None) or DG._param_to_name.get(m, None) or str(m)


def _writes_out(DG, it) -> bool:
    """Does this group item remove output channels (rows) of its layer, rather than inputs?"""
    p = DG.get_pruner_of_module(it.dep.target.module)
    return p is not None and it.dep.handler == p.prune_out_channels


def writers(DG, items) -> list:
    """The conv/linear layers among DepGraph group `items` whose output channels it removes."""
    return [it.dep.target.module for it in items if is_layer(it.dep.target.module) and _writes_out(DG, it)]


def is_layer(m) -> bool:
    """A conv/linear layer whose channels `channel_groups` analyses (GPT-2's Conv1D is a Linear)."""
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or is_conv1d(m)


def cols_first(m) -> bool:
    """Is the weight stored (in, out, ...): a transposed conv or a Conv1D? Rows are then dim 1."""
    return bool(getattr(m, "transposed", False)) or is_conv1d(m)


def is_grouped(m) -> bool:
    """A grouped convolution that is not depthwise (torch-pruning handles depthwise ones)."""
    return isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups != m.out_channels


def _roles(DG, items, attn_linears, grouped=None) -> tuple[set, set, str | None]:
    """(producers, consumers, reason the group cannot be offered or None). Producers write the
    channel (conv/linear rows, embeddings, bare parameters); consumers read it (input columns)."""
    T = _optype()
    producers, consumers = set(), set()
    for it in items:
        node = it.dep.target
        if node.type in (T.CONV, T.LINEAR) or (node.type == T.CUSTOMIZED and is_conv1d(node.module)):
            if is_grouped(node.module) and node.module is not grouped:
                return (
                    producers,
                    consumers,
                    (f"grouped convolution {_name_of(DG, node)} (groups={node.module.groups}) is coupled"),
                )
            if _writes_out(DG, it):
                if node.module in attn_linears:
                    return (
                        producers,
                        consumers,
                        (f"coupled to attention projection {_name_of(DG, node)} (heads are grouped separately)"),
                    )
                producers.add(node)
            else:
                consumers.add(node)
        elif node.type in (T.EMBED, T.PARAMETER):
            producers.add(node)
    return producers, consumers, None


def _output_reason(DG, nodes_in, producers, consumers, out_fns) -> str | None:
    """Why the channel is not ours to remove: it comes from the input or is a model output."""
    T = _optype()
    if not producers:
        return "no layer produces these channels (they come from the network input)"
    for node in nodes_in:
        if node in consumers:
            continue
        if node.type == T.OUTPUT or node.grad_fn in out_fns:
            return f"{_name_of(DG, node)} is a model output (final classifier or returned features)"
    return None


def _nonzero_reason(DG, za, consumers) -> str | None:
    """Why some consumer's input would not be exactly zero; the most telling reason first:
    a normalisation over the channel explains the rest."""
    reasons = []
    for c in sorted(consumers, key=lambda node: _name_of(DG, node)):
        ok, why = za._all(za.data_inputs(c), _name_of(DG, c))
        if not ok and why not in reasons:
            reasons.append(why)
    if reasons:
        return next((r for r in reasons if r.startswith("normalised")), reasons[0])
    return None


def param_index(model) -> dict:
    """name → (position in named_parameters, canonical name), tied aliases included: T5's
    `encoder.embed_tokens.weight` is `shared.weight`, and a group must hold it under that name.
    Bare parameters (torch-pruning's "UnwrappedParameter" nodes) are looked up by identity (id key)."""
    canon = {id(p): (i, n) for i, (n, p) in enumerate(model.named_parameters())}
    return {n: canon[id(p)] for n, p in model.named_parameters(remove_duplicate=False)} | canon


def _slices(DG, items, nodes_in, producers, consumers, za, pnames, n_out, grouped=None) -> tuple[list, list, set]:
    """Per channel c: {(param, dim): indices} to regularize, the same for the dependents, and the
    parameter names the group touches that the model does not have (the group is then refused)."""
    T = _optype()
    group_slices = [{} for _ in range(n_out)]  # (param, dim) -> set
    dep_slices = [{} for _ in range(n_out)]

    def used(node):  # its zero output reaches a consumer or keeps a downstream node zero
        return any(o in consumers or (o in nodes_in and za.zero(o)[0]) for o in node.outputs)

    unknown = set()

    def add(target, pname, dim, idxs, roots):
        if pname not in pnames:
            unknown.add(pname if isinstance(pname, str) else "(a bare parameter)")
            return
        pname = pnames[pname][1]
        for i, r in zip(idxs, roots):
            target[r].setdefault((pname, dim), set()).add(int(i))

    for it in items:
        node = it.dep.target
        idxs, roots = list(it.idxs), list(it.root_idxs)
        m = node.module
        nm = _name_of(DG, node)
        pre = f"{nm}." if nm else ""
        # Role per item, not per node: a layer can write this group's channels (out rows,
        # coupled through a residual add) and read them too (in columns), e.g. the
        # projection of an expand=1 inverted residual with a shortcut.
        if node in consumers and not _writes_out(DG, it):
            if m is grouped:  # whole conv groups go: the weight keeps its per-group columns
                continue
            add(dep_slices, pre + "weight", 0 if cols_first(m) else 1, idxs, roots)
        elif node in producers or node.type in (T.BN, T.DEPTHWISE_CONV):
            target = group_slices if (za.zero(node)[0] and used(node)) else dep_slices
            if node.type == T.PARAMETER:
                add(target, id(m), node.pruning_dim % m.dim(), idxs, roots)
            elif node.type == T.EMBED:
                add(target, pre + "weight", 1, idxs, roots)
            else:
                add(target, pre + "weight", 1 if cols_first(m) else 0, idxs, roots)
                if getattr(m, "bias", None) is not None:
                    add(target, pre + "bias", 0, idxs, roots)
        elif node.type == T.PRELU and m.num_parameters > 1:
            add(dep_slices, pre + "weight", 0, idxs, roots)
    return group_slices, dep_slices, unknown
