"""Removable structures ("groups"): found once, used by the regularizer and by extraction.

A group is *zero-invariant*: when every slice in it is zero, deleting the structure
leaves the network's output unchanged. Regularization (optimizers) and extraction
both read the same `Group` objects so they can never disagree on what a group is.

Which slices are in a group (see `find_groups` for the reasoning):

* ``slices`` — the *producer* side: everything that must be zero for the structure's
  output to be exactly zero (conv/linear weight rows and bias entries, the γ and β of
  every BatchNorm on the channel's path, every channel coupled through residual adds,
  depthwise filters on the path; for a head the q, k, v rows/biases and the
  out-projection columns). These are regularized.
* ``dependents`` — the *consumer* side: slices deleted together with the structure
  whose values do not matter because they only ever multiply the zero channel (the
  next layer's input columns, PReLU slopes). They are not regularized, but cost
  models need them to predict what extraction removes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .io import UserError, atomic_write_json


class Slice(NamedTuple):
    """`param` (a name from model.named_parameters()), sliced at `indices` along `dim`."""

    param: str
    dim: int
    indices: tuple[int, ...]


@dataclass
class Group:
    """One removable structure: a conv/linear output channel, an attention head or an MLP neuron.

    `tensors` holds the live parameters aligned with `slices`; it is filled by
    `find_groups` / `bind_groups` and is never serialized.
    """

    name: str
    kind: str  # "channel" | "head" | "neuron"
    layer: str  # the module whose output structure is removed
    slices: list[Slice]
    weight: float = 1.0
    tensors: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)
    dependents: list[Slice] = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        """Number of parameter entries in the group (the regularized slices only)."""
        if not self.tensors:
            raise ValueError(f"group {self.name} is not bound to a model; call bind_groups")
        return sum(_slice_numel(s, t.shape) for s, t in zip(self.slices, self.tensors))

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "weight": self.weight,
            "slices": [[s.param, s.dim, list(s.indices)] for s in self.slices],
        }
        if self.dependents:
            d["dependents"] = [[s.param, s.dim, list(s.indices)] for s in self.dependents]
        return d

    @staticmethod
    def from_json(d: dict) -> "Group":
        def sl(rows):
            return [Slice(p, int(dim), tuple(int(i) for i in idx)) for p, dim, idx in rows]

        return Group(
            name=d["name"],
            kind=d["kind"],
            layer=d["layer"],
            weight=float(d["weight"]),
            slices=sl(d["slices"]),
            dependents=sl(d.get("dependents", [])),
        )


class GroupList(list):
    """A list of `Group`s plus `not_prunable`: (layer, reason) for structures not offered."""

    def __init__(self, groups=(), not_prunable=()):
        super().__init__(groups)
        self.not_prunable: list[tuple[str, str]] = list(not_prunable)

    def __getstate__(self):  # copies/pickles drop the sparsity index cache (it holds live tensors)
        return {k: v for k, v in self.__dict__.items() if k != "_index"}


def _slice_numel(s: Slice, shape) -> int:
    return len(s.indices) * math.prod(d for i, d in enumerate(shape) if i != s.dim)


def _flatten_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output: tensor, tuple/list, dict or ModelOutput."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten_tensors(v)]
    return []


def _as_args(example_inputs):
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


# --------------------------------------------------------------------------- attention heads


@dataclass
class AttentionUnit:
    """An attention block whose heads can be removed: q/k/v/out Linear modules + head attributes.

    Recognised layouts (all compute softmax(q kᵀ) v per head with heads laid out
    head-major in the q/k/v outputs, then the out projection; the forward must read
    the head count from the attributes or infer it with view(..., -1, head_dim)):
    * a module with int `num_heads` (or `num_attention_heads`) and `head_dim` (or
      `attention_head_size`) and Linear children `q`, `k`, `v`, `out` or
      `q_proj`, `k_proj`, `v_proj`, `out_proj`/`o_proj` (this package's models, HF ViT);
    * Hugging Face BERT: `.self` with query/key/value and the head attributes, and the
      out projection in the sibling `.output.dense`.
    """

    name: str
    holder: str  # module carrying the head-count attributes
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    head_dim: int
    heads_attr: str

    def set_heads(self, model: nn.Module, n: int) -> None:
        """Update the head-count attributes after n heads remain."""
        m = model.get_submodule(self.holder)
        setattr(m, self.heads_attr, n)
        for attr in ("all_head_size", "inner_dim"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, n * self.head_dim)


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


_QKVO = (("q", "k", "v", "out"), ("q_proj", "k_proj", "v_proj", "out_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"))


def attention_units(model: nn.Module) -> list[AttentionUnit]:
    """Every attention block of `model` whose heads `find_groups` offers."""
    units = []
    named = dict(model.named_modules())
    for name, m in named.items():
        if isinstance(m, nn.MultiheadAttention):
            continue
        heads_attr = next((a for a in ("num_heads", "num_attention_heads") if isinstance(getattr(m, a, None), int)), None)
        dim_attr = next((a for a in ("head_dim", "attention_head_size") if isinstance(getattr(m, a, None), int)), None)
        if heads_attr is None or dim_attr is None:
            continue
        nh, hd = getattr(m, heads_attr), getattr(m, dim_attr)
        pre = f"{name}." if name else ""
        names = next((c for c in _QKVO if all(_is_linear(getattr(m, x, None)) for x in c)), None)
        if names:
            units.append(AttentionUnit(name, name, *(pre + c for c in names), nh, hd, heads_attr))
            continue
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = named.get(parent_name)
        out = getattr(getattr(parent, "output", None), "dense", None)
        if name and all(_is_linear(getattr(m, c, None)) for c in ("query", "key", "value")) and _is_linear(out):
            pp = f"{parent_name}." if parent_name else ""
            units.append(
                AttentionUnit(parent_name, name, pre + "query", pre + "key", pre + "value", pp + "output.dense", nh, hd, heads_attr)
            )
    return units


def _head_groups(model: nn.Module, unit: AttentionUnit) -> list[Group]:
    d = unit.head_dim
    mods = {r: model.get_submodule(getattr(unit, r)) for r in ("q", "k", "v", "o")}
    groups = []
    for h in range(unit.num_heads):
        rows = tuple(range(h * d, (h + 1) * d))
        slices = []
        for r in ("q", "k", "v"):
            slices.append(Slice(f"{getattr(unit, r)}.weight", 0, rows))
            if mods[r].bias is not None:
                slices.append(Slice(f"{getattr(unit, r)}.bias", 0, rows))
        slices.append(Slice(f"{unit.o}.weight", 1, rows))
        groups.append(Group(name=f"{unit.name}:head{h}", kind="head", layer=unit.name, slices=slices))
    return groups


# --------------------------------------------------------------------------- DepGraph channels

# Autograd ops that map an all-zero channel to an all-zero channel (f(0) = 0, per channel).
_ZERO_PRESERVING = {
    "Relu", "Gelu", "Silu", "Tanh", "LeakyRelu", "Elu", "Hardswish", "Mish", "Neg",
    "Mul", "View", "Reshape", "ReshapeAlias", "UnsafeView", "Clone", "Cat", "Split",
    "SplitWithSizes", "Slice", "Unbind", "Expand", "Squeeze", "Unsqueeze", "Alias",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool1D",
    "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "NativeDropout",
    "UpsampleNearest1D", "UpsampleNearest2D", "UpsampleBilinear2D", "Contiguous",
}


def _op_name(grad_fn) -> str:
    n = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else "?"
    return n.rstrip("0123456789").removesuffix("Backward")


def _reduction_ok(gf) -> str | None:
    """None if a mean/sum reduces only spatial dims of (N, C, H, W[, D]) features."""
    op = _op_name(gf)
    dims, sizes = getattr(gf, "_saved_dim", None), getattr(gf, "_saved_self_sym_sizes", None)
    if dims is None or sizes is None:
        return f"{op.lower()} over all dimensions (mixes channels)"
    nd = len(sizes)
    dims = {d % nd for d in dims}
    if nd >= 4 and dims <= set(range(2, nd)):
        return None
    return f"{op.lower()} over dims {sorted(dims)} of a {nd}-d tensor may mix channels"


class _ZeroAnalysis:
    """Which nodes of one DepGraph pruning group carry an exactly-zero channel.

    Producers (conv/linear rows, embeddings, unwrapped parameters) are zero by
    construction (their slices are zeroed); zero-ness then propagates forward:
    BatchNorm with γ = β = 0 (eval: γ(x−μ)/σ + β = 0; training likewise), depthwise conv
    with zero filter and bias, PReLU, reshapes/slices/concats and unary ops with
    f(0) = 0 keep a zero input zero; an add needs every addend zero, a product any factor
    zero (so a gate such as squeeze-and-excitation's sigmoid branch may be non-zero),
    a division a zero numerator. Anything else (sigmoid, softplus, LayerNorm, an operand
    from outside the group) is non-zero, and the reason is kept for the report.
    """

    def __init__(self, DG, nodes_in, producers, name_of):
        from torch_pruning import ops

        self.T = ops.OPTYPE
        self.nodes_in, self.producers, self.name_of = nodes_in, producers, name_of
        self.by_fn = {n.grad_fn: n for n in nodes_in if n.grad_fn is not None}
        self.memo: dict = {}

    def operand(self, fn):
        return self.by_fn.get(fn) if fn is not None else None

    def zero(self, node) -> tuple[bool, str | None]:
        if node in self.memo:
            return self.memo[node]
        self.memo[node] = (False, "cycle")  # autograd graphs are acyclic; guard anyway
        self.memo[node] = r = self._zero(node)
        return r

    def _all(self, nodes, what) -> tuple[bool, str | None]:
        if not nodes:
            return False, f"{what} has no input from the zeroed channel"
        for n in nodes:
            z, why = self.zero(n)
            if not z:
                return False, why
        return True, None

    def data_inputs(self, node):
        """In-group inputs carrying activations (not a layer's own weight transposes)."""
        return [i for i in node.inputs if i in self.nodes_in and (i in self.producers or i.inputs)]

    def _zero(self, node) -> tuple[bool, str | None]:
        T = self.T
        if node in self.producers:
            return True, None
        if node not in self.nodes_in:
            return False, f"{self.name_of(node)} is outside the group"
        t, nm = node.type, self.name_of(node)
        ins = self.data_inputs(node)
        if t == T.BN:
            if not node.module.affine:
                return False, f"BatchNorm {nm} has no affine γ/β, so BN(0) = −μ/σ ≠ 0"
            return self._all(ins, nm)
        if t in (T.DEPTHWISE_CONV, T.PRELU, T.RESHAPE, T.SLICE, T.SPLIT, T.UNBIND, T.EXPAND, T.CONCAT):
            return self._all(ins, nm)
        if t in (T.LN, T.GN, T.IN):
            return False, f"normalised over the pruned dimension by {type(node.module).__name__} {nm}"
        if t == T.MHA:
            return False, f"passes through nn.MultiheadAttention {nm} (its heads/embedding are not prunable)"
        if t in (T.CONV, T.LINEAR):
            return False, f"{nm} mixes channels"
        if t != T.ELEMENTWISE:
            return False, f"passes through {type(node.module).__name__} {nm}, which is not known to keep zeros"
        gf = node.grad_fn
        op = _op_name(gf)
        nexts = [f for f, _ in gf.next_functions] if gf is not None else []
        if op in ("Add", "Sub"):
            if len(nexts) < 2 or any(self.operand(f) is None for f in nexts):
                return False, f"{op.lower()} with an operand outside the group (e.g. a constant or an unregistered parameter)"
            return self._all([self.operand(f) for f in nexts], op)
        if op == "Mul":
            why = f"mul with no zero factor"
            for f in nexts:
                n = self.operand(f)
                if n is not None:
                    z, w = self.zero(n)
                    if z:
                        return True, None
                    why = w or why
            return False, why
        if op == "Div":
            n = self.operand(nexts[0]) if nexts else None
            return self.zero(n) if n is not None else (False, "division of a value outside the group")
        if op in ("Addmm", "Mm"):  # inside a consumer nn.Linear applied to a >2-d input
            n = self.operand(nexts[1] if op == "Addmm" else nexts[0]) if nexts else None
            return self.zero(n) if n is not None else (False, f"{op} operand outside the group")
        if op == "Hardtanh":
            lo, hi = getattr(gf, "_saved_min_val", None), getattr(gf, "_saved_max_val", None)
            if lo is None or not lo <= 0 <= hi:
                return False, "hardtanh whose range excludes 0"
            return self._all(ins, op)
        if op == "Threshold":
            if getattr(gf, "_saved_threshold", -1) < 0:
                return False, "threshold op with f(0) != 0"
            return self._all(ins, op)
        if op == "Select":
            dim, sizes = getattr(gf, "_saved_dim", None), getattr(gf, "_saved_self_sym_sizes", None)
            if dim is None or sizes is None:
                return False, "select on an unknown dimension"
            nd, dim = len(sizes), dim % len(sizes)
            if dim == 0 or (nd == 3 and dim == 1) or (nd >= 4 and dim >= 2):  # batch, token or spatial
                return self._all(ins, op)
            return False, f"select on dim {dim} of a {nd}-d tensor may pick out channels"
        if op in ("Mean", "Sum"):
            why = _reduction_ok(gf)
            return (False, why) if why else self._all(ins, op)
        if op in _ZERO_PRESERVING:
            return self._all(ins, op)
        return False, f"op {op} may not map a zero channel to zero (f(0) != 0 or mixes channels)"


def _channel_groups(DG, model, root, root_name, pnames, attn_linears, out_fns):
    """Analyse DepGraph's pruning group rooted at `root`'s output channels.

    Returns (groups, None) or (None, reason). The channel is offered only when, with
    the producer slices zeroed, the input every consumer (a conv/linear whose input
    columns DepGraph removes) reads from this channel is provably exactly zero (see
    `_ZeroAnalysis`) and no member is a model output. Regularized slices: producers
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
    za = _ZeroAnalysis(DG, nodes_in, producers, name_of)
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


GROUP_WEIGHTS = ("size", "flops", "sqrt", "unit")


def find_groups(model: nn.Module, example_inputs, ignored_layers=None, weight: str = "size") -> GroupList:
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

    weight: the regularizer's w_g (`group_weights`): "size" (√entries, the RAMDA paper's choice;
    "sqrt" is the old name), "flops" (∝ the FLOPs removing the group saves) or "unit" (1).
    """
    import torch_pruning as tp

    if weight not in GROUP_WEIGHTS:
        raise UserError(f"group weight must be one of {', '.join(GROUP_WEIGHTS)}, got {weight!r}")
    ignored = set(ignored_layers or [])
    ignored |= {model.get_submodule(n) for n in list(ignored) if isinstance(n, str)}
    named = dict(model.named_modules())
    order = {m: i for i, (_, m) in enumerate(named.items())}
    pnames = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    not_prunable: list[tuple[str, str]] = []
    found: list[tuple[int, list[Group]]] = []

    units = attention_units(model)
    attn_linears = set()
    for u in units:
        for r in (u.q, u.k, u.v):
            attn_linears.add(model.get_submodule(r))
        if model.get_submodule(u.name) in ignored:
            not_prunable.append((u.name, "ignored by the caller"))
            continue
        found.append((order[model.get_submodule(u.name)], _head_groups(model, u)))
    for name, m in named.items():
        if isinstance(m, nn.MultiheadAttention):
            not_prunable.append(
                (name, "nn.MultiheadAttention: heads are not offered (rewrite it with separate q/k/v/out nn.Linear layers and num_heads/head_dim attributes to prune heads)")
            )

    was_training = model.training
    args, kwargs = _as_args(example_inputs)
    outputs = []

    def forward_fn(mod, _):
        out = mod(*args, **kwargs)
        outputs.append(out)
        return out

    try:
        with torch.enable_grad():
            DG = tp.DependencyGraph().build_dependency(
                model, example_inputs=args, forward_fn=forward_fn, verbose=False
            )
    finally:
        model.train(was_training)
    out_fns = {t.grad_fn for t in _flatten_tensors(outputs[0]) if t.grad_fn is not None}

    visited = set(attn_linears)
    for name, m in named.items():
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or m in visited:
            continue
        if m not in DG.module2node:
            not_prunable.append((name, "not reached by the forward pass on the example inputs"))
            continue
        pruner = DG.get_pruner_of_module(m)
        pg = DG.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        members = []
        for it in pg.items:
            mod = it.dep.target.module
            p = DG.get_pruner_of_module(mod) if isinstance(mod, nn.Module) else None
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and p is not None and it.dep.handler == p.prune_out_channels:
                members.append(mod)
        visited.update(members)
        if any(x in ignored for x in members) or m in ignored:
            not_prunable.append((name, "ignored by the caller"))
            continue
        if pruner.get_out_channels(m) <= 1:
            not_prunable.append((name, "a single output channel"))
            continue
        gs, reason = _channel_groups(DG, model, m, name, pnames, attn_linears, out_fns)
        if reason:
            not_prunable.append((name, reason))
            for mod in members:  # every coupled layer is listed, so inspect can show each
                if mod is not m and mod not in attn_linears:
                    not_prunable.append((DG._module2name[mod], f"coupled with {name}: {reason}"))
        else:
            found.append((order[m], gs))
    found.sort(key=lambda t: t[0])
    groups = GroupList([g for _, gs in found for g in gs], not_prunable)
    bind_groups(groups, model)
    for g, w in zip(groups, group_weights(model, groups, example_inputs, weight).tolist()):
        g.weight = w
    return groups


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
    from .budget import CostModel

    sav = CostModel(model, groups, example_inputs).savings(torch.zeros(len(groups), dtype=torch.bool), "flops")
    if not len(groups):
        return sav
    if not bool((sav > 0).any()):
        raise UserError("--group-weight flops: no group saves any FLOPs on the example input; use size")
    size = torch.tensor([math.sqrt(g.size) for g in groups], dtype=torch.float64)
    return sav * (size.mean() / sav.mean())


# --------------------------------------------------------------------------- binding, files


def bind_groups(groups, model: nn.Module):
    """Point every group's `tensors` at `model`'s live parameters (same order as `slices`)."""
    params = dict(model.named_parameters())
    for g in groups:
        try:
            g.tensors = [params[s.param] for s in g.slices]
        except KeyError as e:
            raise UserError(f"group {g.name}: parameter {e.args[0]!r} is not in the model") from None
    if isinstance(groups, GroupList):
        groups.__dict__.pop("_index", None)
    return groups


def save_groups(path, groups) -> None:
    """Write groups (and, when bound, the shapes of their parameters) to JSON atomically."""
    shapes = {}
    for g in groups:
        for s, t in zip(g.slices, g.tensors):
            shapes[s.param] = list(t.shape)
    atomic_write_json(
        path,
        {
            "version": 1,
            "groups": [g.to_json() for g in groups],
            "not_prunable": [list(x) for x in getattr(groups, "not_prunable", [])],
            "param_shapes": shapes,
        },
    )


def load_groups(path, model: nn.Module) -> GroupList:
    """Read groups from `path` and bind them to `model`, checking that every slice fits.

    Raises UserError naming the first parameter that is missing, has another shape than
    when the groups were saved, or is too small for a slice's indices.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"groups file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"groups file {path} is not valid JSON: {e}") from None
    try:
        groups = GroupList([Group.from_json(d) for d in data["groups"]], [tuple(x) for x in data.get("not_prunable", [])])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"groups file {path} is malformed: {e!r}") from None
    params = dict(model.named_parameters())
    saved_shapes = data.get("param_shapes", {})
    for g in groups:
        for s in [*g.slices, *g.dependents]:
            p = params.get(s.param)
            if p is None:
                raise UserError(f"groups file {path}: group {g.name}: parameter {s.param!r} is not in the model")
            want = saved_shapes.get(s.param)
            if want is not None and list(p.shape) != list(want):
                raise UserError(
                    f"groups file {path}: group {g.name}: parameter {s.param!r} has shape {list(p.shape)} in the model but {want} in the file"
                )
            if s.dim >= p.dim() or (s.indices and (max(s.indices) >= p.shape[s.dim] or min(s.indices) < 0)):
                raise UserError(
                    f"groups file {path}: group {g.name}: indices on dim {s.dim} do not fit parameter {s.param!r} of shape {list(p.shape)}"
                )
    return bind_groups(groups, model)


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
                sizes[gi] += _slice_numel(s, t.shape)
        self.parts = {k: (torch.tensor(p, dtype=torch.long), torch.tensor(g, dtype=torch.long)) for k, (p, g) in parts.items()}
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
    if idx is None or idx.n != len(groups) or any(
        idx.tensor.get(s.param) is not t for g in groups[:1] for s, t in zip(g.slices, g.tensors)
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
