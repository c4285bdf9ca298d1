"""find_groups: the removable structures of a model, and their group weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.errors import UserError
from compress.structure.attention import attention_units, head_groups
from compress.structure.channels import channel_groups, is_grouped, is_layer, param_index, writers
from compress.structure.coverage import nothing_found, unanalysed_layers
from compress.structure.depgraph import build_graph
from compress.structure.group import Group, GroupList, bind_groups
from compress.structure.grouped import conv_groups
from compress.structure.head_check import check_units
from compress.structure.soundness import check_groups
from compress.structure.tensors import as_args, flatten_tensors

GROUP_WEIGHTS = ("size", "flops", "sqrt", "unit")


def find_groups(
    model: nn.Module, example_inputs, ignored_layers=None, weight: str = "size", check: bool = True
) -> GroupList:
    """All zero-invariant groups of `model`, bound to its live parameters.

    Channels/neurons come from torch-pruning's DependencyGraph: for each conv/linear
    (in module order) not yet covered, its output channels' pruning group is taken
    and split per channel; coupled layers (e.g. the stem conv and every residual
    branch of its stage) therefore form one group per channel. DepGraph's group also
    lists the *consumers* (the next layer's input columns); those go to
    `Group.dependents`, not to the regularized slices: once the producer rows, biases
    and BN γ/β are zero the channel is exactly zero after any f(0)=0 activation, so
    the consumer's columns multiply zeros and removing them changes nothing. Attention
    heads (see `AttentionUnit`) are grouped directly: q, k, v rows and biases of the
    head plus the out-projection columns. Structures whose removal would not be exact
    are listed in `.not_prunable` with the reason.

    check: run the randomized zero-invariance check (`soundness.check_groups`) and drop, with
    the reason, the layers whose groups do not remove exactly.
    weight: the regularizer's w_g (`group_weights`): "size" (√entries, the RAMDA paper's choice;
    "sqrt" is the old name), "flops" (∝ the FLOPs removing the group saves) or "unit" (1).
    """
    if weight not in GROUP_WEIGHTS:
        raise UserError(f"group weight must be one of {', '.join(GROUP_WEIGHTS)}, got {weight!r}")
    ignored = set(ignored_layers or [])
    ignored |= {model.get_submodule(n) for n in list(ignored) if isinstance(n, str)}
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    not_prunable: list[tuple[str, str]] = []
    found: list[tuple[int, list[Group]]] = []
    attn_linears = _head_groups(model, ignored, order, found, not_prunable, example_inputs if check else None)
    DG, out_fns = _dependency_graph(model, example_inputs)
    _channel_groups(model, DG, out_fns, ignored, attn_linears, order, found, not_prunable)
    found.sort(key=lambda t: t[0])
    not_prunable += unanalysed_layers(model)
    groups = GroupList([g for _, gs in found for g in gs], not_prunable)
    if check:
        groups, _ = check_groups(model, groups, example_inputs)
    if not len(groups):
        groups.not_prunable.append(nothing_found(model, sum(p.dim() >= 2 for p in model.parameters())))
    bind_groups(groups, model)
    for g, w in zip(groups, group_weights(model, groups, example_inputs, weight).tolist()):
        g.weight = w
    return groups


def _head_groups(model, ignored, order, found, not_prunable, example_inputs=None) -> set:
    """Append the head groups of every attention unit to `found`; return their q/k/v linears,
    which channel grouping must leave alone. With `example_inputs`, a unit whose one-head removal
    is not exact on its own inputs is refused with the reason (`head_check`)."""
    attn_linears = set()
    units = all_units = attention_units(model)
    if example_inputs is not None:
        units, refused = check_units(model, units, example_inputs)
        not_prunable += refused
    for u in all_units:
        attn_linears.update(model.get_submodule(r) for r in {u.q, u.k, u.v})
    for u in units:
        if model.get_submodule(u.name) in ignored:
            not_prunable.append((u.name, "ignored by the caller"))
            continue
        found.append((order[model.get_submodule(u.name)], head_groups(model, u)))
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and name not in {u.name for u in all_units}:
            not_prunable.append(
                (
                    name,
                    "nn.MultiheadAttention: heads are not offered (rewrite it with separate q/k/v/out nn.Linear layers and num_heads/head_dim attributes to prune heads)",
                )
            )
    return attn_linears


def _dependency_graph(model, example_inputs):
    """DepGraph traced on the example, and the grad_fns of the model's outputs."""
    was_training = model.training
    args, kwargs = as_args(example_inputs)
    outputs = []

    def forward_fn(mod, _):
        out = mod(*args, **kwargs)
        outputs.append(out)
        return out

    try:
        DG = build_graph(model, args, kwargs, forward_fn, frozen=True)
    finally:
        model.train(was_training)
    return DG, {t.grad_fn for t in flatten_tensors(outputs[0]) if t.grad_fn is not None}


def _out_members(DG, m) -> tuple[list, list]:
    """(the conv/linear layers whose output channels are coupled with `m`'s (m included), the items
    of `m`'s pruning group — reused by `channel_groups`: each get_pruning_group walks the graph)."""
    pruner = DG.get_pruner_of_module(m)
    items = list(DG.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m)))).items)
    return writers(DG, items), items


def _grouped_conv_groups(model, DG, out_fns, ignored, attn_linears, pnames, visited, order, found, not_prunable):
    """Append the whole-conv-group groups of every grouped (not depthwise) conv to `found` and add
    the conv and its coupled producers to `visited`; refused ones are left to `_channel_groups`,
    whose own reason then names the grouped conv, and listed here with why (`grouped.py`)."""
    for name, m in model.named_modules():
        if not is_grouped(m) or m in visited or m not in DG.module2node:
            continue
        try:
            gs, members, reason = conv_groups(DG, model, m, name, pnames, attn_linears, out_fns)
        except Exception as e:  # noqa: BLE001 - torch-pruning cannot trace this coupling: refuse, say why
            gs, members, reason = None, [m], f"torch-pruning cannot build its group ({type(e).__name__}: {e})"
        if reason is None and any(x in ignored for x in members):
            reason = "ignored by the caller"
        if reason is not None:
            not_prunable.append((name, reason))
            visited.add(m)
            continue
        visited.update(members)
        found.append((order[m], gs))


def _channel_groups(model, DG, out_fns, ignored, attn_linears, order, found, not_prunable) -> None:
    """Append the channel/neuron groups of every conv/linear (in module order) not yet covered
    by a coupled layer to `found`, and every layer that cannot be grouped to `not_prunable`."""
    pnames = param_index(model)
    visited = set(attn_linears)
    _grouped_conv_groups(model, DG, out_fns, ignored, attn_linears, pnames, visited, order, found, not_prunable)
    for name, m in model.named_modules():
        if not is_layer(m) or m in visited:
            continue
        if m not in DG.module2node:
            not_prunable.append((name, "not reached by the forward pass on the example inputs"))
            continue
        try:
            members, items = _out_members(DG, m)
        except Exception as e:  # noqa: BLE001 - torch-pruning cannot trace this coupling: refuse, say why
            not_prunable.append((name, f"torch-pruning cannot build its group ({type(e).__name__}: {e})"))
            continue
        visited.update(members)
        if any(x in ignored for x in members) or m in ignored:
            not_prunable.append((name, "ignored by the caller"))
            continue
        if DG.get_pruner_of_module(m).get_out_channels(m) <= 1:
            not_prunable.append((name, "a single output channel"))
            continue
        try:
            gs, reason = channel_groups(DG, model, m, name, pnames, attn_linears, out_fns, items)
        except Exception as e:  # noqa: BLE001 - as above
            gs, reason = None, f"torch-pruning cannot build its group ({type(e).__name__}: {e})"
        if reason:
            not_prunable.append((name, reason))
            for mod in members:  # every coupled layer is listed, so inspect can show each
                if mod is not m and mod not in attn_linears:
                    not_prunable.append((DG._module2name[mod], f"coupled with {name}: {reason}"))
        else:
            found.append((order[m], gs))


def group_weights(model: nn.Module, groups, example_inputs, weight: str = "size") -> torch.Tensor:
    """w_g for every group (float64): "size"/"sqrt" √entries; "unit" 1; "flops" the FLOPs that
    removing the group alone saves in the dense model (`CostModel.savings` with nothing zero:
    its slices and dependents, i.e. the consumers' input columns too), scaled so the mean equals
    the mean √entries — λ keeps the scale it has with size weights, while the penalty moves to
    the structures that cost the most to run."""
    if weight in ("size", "sqrt"):
        return torch.tensor([math.sqrt(g.size) for g in groups], dtype=torch.float64)
    if weight == "unit":
        return torch.ones(len(groups), dtype=torch.float64)
    if weight != "flops":
        raise UserError(f"group weight must be one of {', '.join(GROUP_WEIGHTS)}, got {weight!r}")
    from compress.structure.cost_model import CostModel

    sav = CostModel(model, groups, example_inputs).savings(torch.zeros(len(groups), dtype=torch.bool), "flops")
    if not len(groups):
        return sav
    if not bool((sav > 0).any()):
        raise UserError(
            "`group_weight` flops: no group saves any FLOPs on the example input; use size", field="group_weight"
        )
    size = torch.tensor([math.sqrt(g.size) for g in groups], dtype=torch.float64)
    return sav * (size.mean() / sav.mean())
