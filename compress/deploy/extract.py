"""Physical removal of exactly-zero groups, verified against the dense model.

Channels and MLP neurons are removed with torch-pruning (`get_pruning_group`,
`check_pruning_group`, `prune`) so every coupled layer (residual adds, BatchNorm,
depthwise convs, consumers' input columns) shrinks consistently; attention heads are
removed row/column-wise with torch-pruning's linear pruners and the head-count
attributes updated (an attention block with no head left returns its out projection's bias,
`structure.no_heads`). The result is only returned after dense and compressed outputs
agree to `atol` relative to the output scale; otherwise `ExtractionError` names the
group whose removal broke the equivalence.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict

import torch
from torch import nn

from compress.errors import UserError
from compress.structure.attention import (
    AttentionUnit,
    attention_units,
    head_index,
    unit_linears,
)
from compress.structure.channels import cols_first
from compress.structure.cost import count_flops, count_params
from compress.structure.depgraph import build_graph
from compress.structure.depgraph import prune_conv1d as _prune_conv1d
from compress.structure.group import GroupList, bind_groups
from compress.structure.grouped import KIND as CONV_GROUP
from compress.structure.grouped import conv_group_index
from compress.structure.levit import keep_cached_biases, norm_of
from compress.structure.mha import SplitHeadAttention
from compress.structure.no_heads import mark, whole_form
from compress.structure.shared_bias import keep_heads
from compress.structure.sparsity import zero_mask
from compress.structure.tensors import as_args, flatten_tensors
from compress.structure.window_attention import install as install_explicit_heads


class ExtractionError(UserError):
    """Compressed and dense outputs differ: the named group was not zero-invariant."""

    def __init__(self, message: str, group: str | None = None):
        super().__init__(message)
        self.group = group


def _outputs(model, args, kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t.detach().float() for t in flatten_tensors(out) if t.is_floating_point()]


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs diff, output scale = max |ref|)."""
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return math.inf, max((float(a.abs().max()) for a in ref if a.numel()), default=0.0)
    diff = max((float((a - b).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in ref if a.numel()), default=0.0)
    if any(bool(torch.isnan(b).any()) and not bool(torch.isnan(a).any()) for a, b in zip(ref, got)):
        diff = math.inf
    return diff, scale


def _ok(diff: float, scale: float, atol: float) -> bool:
    return diff <= atol * (scale if scale > 0 else 1.0)


def _channel_index(g, layer_module_weight: str, transposed: bool) -> list[int]:
    dim = 1 if transposed else 0
    for s in g.slices:
        if s.param == layer_module_weight and s.dim == dim:
            return list(s.indices)
    raise ExtractionError(
        f"group {g.name}: no slice of {layer_module_weight} on dim {dim}; the groups do not match the model", g.name
    )


def _plan(model, groups, zero: torch.Tensor, align: int = 1):
    """Per layer: which groups to remove; an all-zero layer keeps one group (reported), except an
    attention block whose groups say it may go whole (`Group.whole`, checked when found).

    `align` > 1 keeps extra zero groups so each channel/neuron layer keeps a multiple of
    `align` structures: CPU kernels (MLAS) run 8-aligned widths much faster, e.g. digits-resnet
    with 25/18/10 channels ran no faster than dense 32/32/32 while 32/24/16 ran 1.26x faster
    (ORT, 1 thread, batch 32). Kept zero groups change nothing in the output.
    """
    by_layer: OrderedDict[str, list[int]] = OrderedDict()
    for i, g in enumerate(groups):
        by_layer.setdefault(g.layer, []).append(i)
    plan = OrderedDict()
    for layer, idx in by_layer.items():
        z = [i for i in idx if bool(zero[i])]
        entry = {"kind": groups[idx[0]].kind, "groups": len(idx), "zero": len(z), "remove": z, "kept": None, "note": ""}
        if z and len(z) == len(idx) and groups[idx[0]].whole:
            entry["note"] = f"all {len(idx)} heads are zero: the attention block is removed (it returns its bias)"
        elif z and len(z) == len(idx):
            # torch-pruning cannot delete every channel of a layer; the layer's output is
            # identically zero, so keeping any one of its groups is still exact.
            keep = z[0]
            entry["remove"] = z[1:]
            entry["kept"] = groups[keep].name
            entry["note"] = (
                f"all {len(idx)} groups are zero; kept {groups[keep].name} (its output is exactly zero) "
                "because the layer cannot be removed entirely"
            )
        kept = len(idx) - len(entry["remove"])
        if align > 1 and groups[idx[0]].kind not in ("head", CONV_GROUP) and kept % align:
            extra = min(len(entry["remove"]), align - kept % align)
            entry["remove"] = entry["remove"][: len(entry["remove"]) - extra]
            entry["aligned"] = extra
            entry["note"] = (
                entry["note"] + "; " if entry["note"] else ""
            ) + f"kept {extra} zero groups so {kept + extra} (a multiple of {align}) remain"
        plan[layer] = entry
    return plan


def _remove(work: nn.Module, groups, plan, layers, args, kwargs, DG=None):
    """Remove the planned groups of `layers` from `work` in place."""

    units = {u.name: u for u in attention_units(work)}
    chan_layers = [ly for ly in layers if plan[ly]["remove"] and groups[plan[ly]["remove"][0]].kind != "head"]
    if chan_layers and DG is None:
        DG = build_graph(work, args, kwargs, frozen=True)  # remapped only after a prune, below
        work.eval()
    for layer in layers:
        rm = plan[layer]["remove"]
        if not rm:
            continue
        if groups[rm[0]].kind == "head":
            _remove_heads(work, units.get(layer), [groups[i] for i in rm], layer)
            continue
        root = work.get_submodule(layer)
        transposed = cols_first(root)
        idxs = sorted({c for i in rm for c in _channel_index(groups[i], f"{layer}.weight", transposed)})
        if groups[rm[0]].kind == CONV_GROUP:
            _remove_conv_groups(DG, root, idxs)
            DG._compress_mapped = False
            continue
        pruner = DG.get_pruner_of_module(root)
        pg = DG.get_pruning_group(root, pruner.prune_out_channels, idxs)
        if not DG.check_pruning_group(pg):
            raise ExtractionError(
                f"layer {layer}: torch-pruning refuses to remove channels {idxs[:8]}... (a coupled layer would lose all channels)",
                groups[rm[0]].name,
            )
        pg.prune()
        DG._compress_mapped = False  # channel counts changed: the next group remaps reshapes
    return DG


def _remove_conv_groups(DG, conv, rows) -> None:
    """Drop the conv groups of `conv` that output channels `rows` belong to (`grouped.py`): the
    coupled layers through torch-pruning (both of the conv's pruning groups, the conv left out),
    then the conv's own rows, its input width and its group count."""
    gone, cols = conv_group_index(conv, rows)
    b = conv.out_channels // conv.groups
    if sorted(rows) != [j * b + t for j in gone for t in range(b)]:
        raise ExtractionError(f"{DG._module2name[conv]}: channels {rows[:8]}... are not whole conv groups")
    pruner = DG.get_pruner_of_module(conv)
    pgs = [DG.get_pruning_group(conv, pruner.prune_out_channels, rows)]
    pgs.append(DG.get_pruning_group(conv, pruner.prune_in_channels, cols))
    for pg in pgs:
        pg._group = [it for it in pg.items if it.dep.target.module is not conv]
        pg.prune(record_history=False)
    keep = torch.tensor([r for r in range(conv.out_channels) if r not in set(rows)])
    conv.weight = nn.Parameter(conv.weight.data.index_select(0, keep).contiguous(), conv.weight.requires_grad)
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data.index_select(0, keep).contiguous(), conv.bias.requires_grad)
    conv.out_channels, conv.in_channels = len(keep), conv.in_channels - len(cols)
    conv.groups -= len(gone)


def _remove_heads(work, unit: AttentionUnit | None, gs, layer):
    """Drop the rows/columns (and per-head table entries) of head groups `gs` of `unit`; adapt the
    forms whose forward cannot hold fewer heads (see AttentionUnit) and remove a block whole when
    every head goes and `no_heads` knows its form."""
    import torch_pruning as tp

    if unit is None:
        raise ExtractionError(f"layer {layer}: head groups given but no attention block of that name", gs[0].name)
    heads = sorted({head_index(g.name) for g in gs})
    form = whole_form(work, unit) if len(heads) == unit.n_groups else None
    if unit.mha and form:
        _drop_mha_heads(work.get_submodule(unit.name))
        mark(work, unit, form)
        return
    if unit.mha:  # nn.MultiheadAttention cannot hold fewer heads: swap in the split equivalent
        keep = [h for h in range(unit.num_heads) if h not in heads]
        _replace(work, unit.name, SplitHeadAttention(work.get_submodule(unit.name), keep))
        return
    if unit.swap in ("swin", "maxvit"):
        install_explicit_heads(work.get_submodule(unit.name), unit.swap)  # same module and parameters
    gone = {q for h in heads for q in range(h * unit.q_per_group, (h + 1) * unit.q_per_group)}
    if unit.swap == "shared_bias":
        keep_heads(work.get_submodule(unit.holder), sorted(gone))
    mods = unit_linears(work, unit)
    for role, mod in mods.items():
        rows = sorted(r for h in heads for r in unit.rows(h)[role])
        if unit.transposed:
            _prune_conv1d(mod, rows, outputs=role != "o")
        elif role == "o":
            tp.prune_linear_in_channels(mod, rows)
        else:
            tp.prune_linear_out_channels(mod, rows)
            bn = norm_of(work, unit.param(role, "weight")[: -len(".weight")]) if unit.swap == "levit" else None
            if bn:
                tp.prune_batchnorm_out_channels(work.get_submodule(bn), rows)
    _slice_tables(work, unit, gone)
    unit.set_heads(work, unit.n_groups - len(heads))
    if form:
        mark(work, unit, form)


def _slice_tables(work, unit: AttentionUnit, gone: set[int]) -> None:
    """Drop the entries of heads `gone` from the unit's per-head parameters (bias tables, …)."""
    for t, dim in unit.tables:
        holder, pname = t.rsplit(".", 1) if "." in t else ("", t)
        mod, p = work.get_submodule(holder), work.get_parameter(t)
        keep = torch.tensor([i for i in range(p.shape[dim]) if i not in gone], dtype=torch.long)
        setattr(mod, pname, nn.Parameter(p.data.index_select(dim, keep).contiguous(), p.requires_grad))
        if unit.swap == "levit":
            keep_cached_biases(mod, keep)
        if isinstance(mod, nn.Linear):  # Swin V2's cpb MLP: its output rows are the heads
            mod.out_features = len(keep)


def _drop_mha_heads(m: nn.MultiheadAttention) -> None:
    """Every row of the packed in_proj and every column of out_proj (no head left)."""
    for name in ("in_proj_weight", "in_proj_bias"):
        p = getattr(m, name)
        if p is not None:
            setattr(m, name, nn.Parameter(p.data[:0].contiguous(), p.requires_grad))
    w = m.out_proj.weight
    m.out_proj.weight = nn.Parameter(w.data[:, :0].contiguous(), w.requires_grad)
    m.out_proj.in_features = 0
    m.num_heads = 0


def _replace(work: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(work.get_submodule(parent), attr, new)


def predicted_params(model: nn.Module, groups, remove: list[int]) -> int:
    """Parameter count after removing groups `remove`, from shapes alone (slices + dependents)."""
    params = dict(model.named_parameters())
    cut: dict[str, dict[int, set]] = {}
    for i in remove:
        g = groups[i]
        for s in [*g.slices, *g.dependents]:
            cut.setdefault(s.param, {}).setdefault(s.dim, set()).update(s.indices)
    total = 0
    for name, p in params.items():
        dims = cut.get(name, {})
        total += math.prod(n - len(dims.get(d, ())) for d, n in enumerate(p.shape))
    return total


def extract(model: nn.Module, groups, example_inputs, atol: float = 1e-5, verify_inputs=None, align: int = 1):
    """Copy `model`, remove its exactly-zero groups, verify, return (small_model, report).

    `model` is not modified. Outputs of dense and compressed models (eval mode) on
    `verify_inputs` (default: `example_inputs`) must agree to `atol` × max|dense output|;
    otherwise ExtractionError names the offending group. A layer whose groups are all
    zero keeps one group (stated in the report's layer note), except an attention block of a
    form `structure.no_heads` removes whole. With no zero group the
    result is an unchanged copy. The returned model is in eval mode. `align`: keep a multiple
    of this many channels/neurons per layer (see `_plan`).
    """
    args, kwargs = as_args(example_inputs)
    vargs, vkwargs = as_args(verify_inputs) if verify_inputs is not None else (args, kwargs)
    was_training = model.training
    model.eval()
    try:
        ref = _outputs(model, vargs, vkwargs)
        params_before = count_params(model)
        flops_before = count_flops(model, example_inputs)
        work = copy.deepcopy(model)
    finally:
        model.train(was_training)
    work.eval()
    gl = bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in groups]), work)
    zero = zero_mask(gl)
    plan = _plan(work, gl, zero, align)
    removed = [i for e in plan.values() for i in e["remove"]]
    predicted = predicted_params(work, gl, removed)

    layers = list(plan)
    _remove(work, gl, plan, layers, args, kwargs)
    work.eval()
    diff, scale = _check_equivalent(model, work, gl, plan, (args, kwargs), (vargs, vkwargs), ref, atol)
    report = {
        "params_before": params_before,
        "params_after": count_params(work),
        "params_predicted": predicted,
        "flops_before": flops_before,
        "flops_after": count_flops(work, example_inputs),
        "groups_total": len(gl),
        "groups_zero": int(zero.sum()),
        "groups_removed": len(removed),
        "max_abs_diff": diff,
        "output_scale": scale,
        "rel_diff": diff / scale if scale > 0 else diff,
        "atol": atol,
        "layers": {
            ly: {k: (len(v) if k == "remove" else v) for k, v in e.items()} | {"removed": len(e["remove"])}
            for ly, e in plan.items()
        },
        "removed_groups": [gl[i].name for i in removed],
    }
    for e in report["layers"].values():
        e.pop("remove")
    return work, report


def _check_equivalent(model, work, gl, plan, inputs, verify, ref, atol) -> tuple[float, float]:
    """(max |Δ|, output scale) of `work` against the dense outputs `ref`; ExtractionError naming
    the first group that breaks equivalence when they disagree."""
    try:
        got = _outputs(work, *verify)
    except Exception as e:  # a shape error: some removal was inconsistent
        got, err = None, e
    diff, scale = _compare(ref, got) if got is not None else (math.inf, 0.0)
    if not _ok(diff, scale, atol):
        culprit, why = _locate(model, gl, plan, *inputs, *verify, ref, atol)
        detail = f"max abs diff {diff:.3g} vs output scale {scale:.3g}" if got is not None else f"forward failed: {err}"
        raise ExtractionError(
            f"removing group {culprit} changes the model's output ({why}); overall {detail}. "
            "The group is not zero-invariant: check the layers between it and its consumers",
            culprit,
        )
    return diff, scale


def _locate(model, gl, plan, args, kwargs, vargs, vkwargs, ref, atol):
    """Find the first layer (then group) whose removal breaks equivalence."""
    work = copy.deepcopy(model).eval()
    g2 = bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in gl]), work)
    for layer in [ly for ly, e in plan.items() if e["remove"]]:
        before = copy.deepcopy(work)
        try:
            _remove(work, g2, plan, [layer], args, kwargs)
            d, s = _compare(ref, _outputs(work.eval(), vargs, vkwargs))
        except Exception:  # noqa: BLE001 - reported to the user
            d, s = math.inf, 0.0
        if _ok(d, s, atol):
            continue
        for i in plan[layer]["remove"][:32]:
            trial = copy.deepcopy(before)
            g3 = bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in gl]), trial)
            single = {layer: dict(plan[layer], remove=[i])}
            try:
                _remove(trial, g3, single, [layer], args, kwargs)
                d1, s1 = _compare(ref, _outputs(trial.eval(), vargs, vkwargs))
            except Exception:  # noqa: BLE001
                d1, s1 = math.inf, 0.0
            if not _ok(d1, s1, atol):
                return gl[i].name, f"max abs diff {d1:.3g} after removing it alone"
        return gl[plan[layer]["remove"][0]].name, f"layer {layer} fails only with several groups removed"
    return "?", "no single layer reproduces the failure"
