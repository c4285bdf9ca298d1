"""Attention units: the heads of an attention block as removable groups.

A head group holds, for one head (or, with grouped-query attention, one key/value head
together with the query heads that read it), the rows of q, k and v it owns, their bias
entries, the out-projection's input columns, and per-head parameters such as a relative
position bias table's column. Removing it is exact: the head's contribution to the out
projection is its columns times its (zeroed) values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compress.structure.group import Group, Slice
from compress.structure.levit import levit_layout, norm_of, set_levit_widths
from compress.structure.mha import mha_prunable
from compress.structure.shared_bias import is_shared_bias_attention
from compress.structure.window_attention import torchvision_form, window_per_head

_Q = ("q", "q_proj", "q_lin", "query")
_K = ("k", "k_proj", "k_lin", "key")
_V = ("v", "v_proj", "v_lin", "value")
_O = ("out", "out_proj", "o_proj", "out_lin", "o", "dense")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_DIMS = ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv")
_WIDTH_ATTRS = ("all_head_size", "inner_dim", "attn_dim", "split_size")
# (rows [q; k; v], out projection): timm, torchvision Swin, GPT-2, torchvision MaxViT
_FUSED = (("qkv", "proj"), ("c_attn", "c_proj"), ("to_qkv", "merge"))
_BIAS_TABLES = ("relative_position_bias_table",)


@dataclass
class AttentionUnit:
    """An attention block whose heads can be removed.

    Layouts (all compute softmax(q kᵀ) v per head, heads laid out head-major in the q/k/v
    outputs, then the out projection; the forward must read the head count from the
    attributes or infer it with view(..., -1, head_dim)):
    * separate q/k/v/out Linear children (`q`/`q_proj`/`q_lin`/`query`, …) of a module with a
      head count (`num_heads`, `num_attention_heads`, `n_heads`) and/or a head size (`head_dim`,
      `attention_head_size`, `key_value_proj_dim`), the other inferred from q's width — this
      package's models, HF ViT, DistilBERT, ALBERT, LLaMA/Mistral/Qwen2 (`head_dim` only);
    * fewer k/v heads than query heads (grouped-query / multi-query attention): one group is a
      k/v head with the `num_heads // kv_heads` query heads that read it;
    * Hugging Face BERT: `.self` with query/key/value, the out projection in `.output.dense`;
    * a fused `qkv` Linear (rows [q; k; v]) and `proj` (timm `Attention`): q = k = v = the qkv
      name and `fused` is set; GPT-2's `c_attn`/`c_proj` likewise, as `Conv1D` (a Linear whose
      weight is stored (in, out): `transposed`, rows on dim 1, the out projection's columns on dim 0);
    * nn.MultiheadAttention with a packed in_proj (`mha`): q = k = v = the module's name;
    * torchvision Swin's `ShiftedWindowAttention` (V1, V2) and MaxViT's attention (`to_qkv`,
      `merge`): fused, `swap` = "swin" / "maxvit" (their forwards reshape the heads back to the
      input width; extraction installs an explicit-head-size forward first, `window_attention`);
    * T5's attention, whose position bias is shared across blocks: `swap` = "shared_bias"
      (extraction makes the block add only its kept heads' rows, see `shared_bias`);
    * timm LeViT (`swap` = "levit", `levit`): each head's q/k/v rows are one contiguous block of
      a Linear+BatchNorm (`per_head` rows per head of each role: "qkv", or "q" and "kv").
    """

    name: str
    holder: str  # module carrying the head-count attributes
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    head_dim: int
    heads_attr: str | None
    kv_heads: int = 0  # 0: as many as query heads
    fused: bool = False
    mha: bool = False  # nn.MultiheadAttention: packed in_proj; extraction swaps in SplitHeadAttention
    transposed: bool = False  # Conv1D projections: weight (in, out)
    tables: list[tuple[str, int]] = field(default_factory=list)  # per-head parameters: (name, head dim)
    swap: str = ""  # "swin" / "maxvit" / "shared_bias": the block's forward is adapted at removal (see above)
    per_head: dict[str, int] = field(default_factory=dict)  # role → rows per head, heads interleaved (LeViT)
    whole: bool = False  # removing every head was checked exact at find time (`head_check`, `no_heads`)

    @property
    def n_groups(self) -> int:
        return self.kv_heads or self.num_heads

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.n_groups

    def rows(self, g: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """For group g: module name → (its output rows in this group, …) for q, k, v; o columns under 'o'."""
        if self.per_head:
            return {role: tuple(range(g * n, (g + 1) * n)) for role, n in self.per_head.items()}
        d, n = self.head_dim, self.q_per_group
        qrows = tuple(range(g * n * d, (g + 1) * n * d))
        kv = tuple(range(g * d, (g + 1) * d)) if self.kv_heads else qrows
        if self.fused or self.mha:
            width = self.num_heads * d
            return {"qkv": qrows + tuple(width + r for r in kv) + tuple(2 * width + r for r in kv), "o": qrows}
        return {"q": qrows, "k": kv, "v": kv, "o": qrows}

    def set_heads(self, model: nn.Module, n_groups: int) -> None:
        """Update the head-count attributes after `n_groups` groups remain."""
        m = model.get_submodule(self.holder)
        heads = n_groups * self.q_per_group
        if self.heads_attr:
            setattr(m, self.heads_attr, heads)
        for attr in _WIDTH_ATTRS:
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, heads * self.head_dim)
        if self.kv_heads and isinstance(getattr(m, "num_key_value_heads", None), int):
            m.num_key_value_heads = n_groups
        if self.swap == "levit":
            set_levit_widths(m, heads)

    def param(self, role: str, what: str) -> str:
        """Name of the weight/bias parameter of `role` ('q', 'k', 'v', 'qkv', 'kv', 'o')."""
        if self.mha and role != "o":
            return f"{self.name}.in_proj_{what}" if self.name else f"in_proj_{what}"
        return f"{self.o if role == 'o' else getattr(self, role[0])}.{what}"


def is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def is_conv1d(m) -> bool:
    """GPT-2's Conv1D (transformers): y = x·W + b with W of shape (nx, nf); matched by its layout."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(getattr(m, "nf", None), int)
        and isinstance(w, nn.Parameter)
        and w.dim() == 2
        and tuple(w.shape) == (m.nx, m.nf)
    )


def _in_out(m) -> tuple[int, int] | None:
    """(in, out) features of a Linear or a Conv1D, else None."""
    if is_linear(m):
        return m.in_features, m.out_features
    return (m.nx, m.nf) if is_conv1d(m) else None


def _child(m, names):
    return next((n for n in names if is_linear(getattr(m, n, None))), None)


def _head_shape(m, q_width: int):
    """(num_heads, head_dim, heads attribute) from whichever attributes exist, or None."""
    heads_attr = next((a for a in _HEADS if isinstance(getattr(m, a, None), int) and getattr(m, a) > 0), None)
    dim_attr = next((a for a in _DIMS if isinstance(getattr(m, a, None), int) and getattr(m, a) > 0), None)
    nh = getattr(m, heads_attr) if heads_attr else None
    hd = getattr(m, dim_attr) if dim_attr else None
    if nh is None and hd is None:
        return None
    if q_width == 0 and hd and isinstance(getattr(m, "heads_removed", None), str):  # a block removed whole
        return 0, hd, next((a for a in _HEADS if getattr(m, a, None) == 0), None)
    nh = nh or q_width // hd
    hd = hd or q_width // nh
    if nh < 1 or nh * hd != q_width:
        return None
    return nh, hd, heads_attr


def _tables(m, pre, nh) -> list[tuple[str, int]]:
    """Per-head tables of the block or its children (HF Swin keeps it in `.relative_position_bias`),
    heads on their last dim, and Swin V2's logit scale and cpb MLP rows."""
    last = [
        (pre + n, p.dim() - 1)
        for n, p in m.named_parameters()
        if n.rsplit(".", 1)[-1] in _BIAS_TABLES and p.shape[-1] == nh
    ]
    return last + [(pre + n, d) for n, d in window_per_head(m)]


def _unit(name, m, named) -> AttentionUnit | None:
    levit = levit_layout(name, m)
    if levit is not None:
        return AttentionUnit(name=name, holder=name, **levit)
    pre = f"{name}." if name else ""
    for qkv_name, proj_name in _FUSED:
        qkv, proj = _in_out(getattr(m, qkv_name, None)), _in_out(getattr(m, proj_name, None))
        if qkv is None or proj is None:
            continue
        shape = _head_shape(m, qkv[1] // 3)
        if shape is None or qkv[1] % 3 or proj[0] != qkv[1] // 3:
            return None
        nh, hd, attr = shape
        return AttentionUnit(
            name,
            name,
            pre + qkv_name,
            pre + qkv_name,
            pre + qkv_name,
            pre + proj_name,
            nh,
            hd,
            attr,
            fused=True,
            tables=_tables(m, pre, nh),
            transposed=is_conv1d(getattr(m, qkv_name)),
            swap=torchvision_form(m),
        )
    q, k, v = _child(m, _Q), _child(m, _K), _child(m, _V)
    if not (q and k and v):
        return None
    shape = _head_shape(m, getattr(m, q).out_features)
    if shape is None:
        return None
    nh, hd, attr = shape
    unit_name, o = name, _child(m, tuple(c for c in _O if c != "dense"))
    if o is not None:
        o = pre + o
    else:  # BERT: the out projection is the sibling .output.dense; ALBERT: .dense on the module
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        out = getattr(getattr(named.get(parent_name), "output", None), "dense", None)
        if name and is_linear(out):
            unit_name, o = parent_name, (f"{parent_name}." if parent_name else "") + "output.dense"
        elif is_linear(getattr(m, "dense", None)):
            o = pre + "dense"
        else:
            return None
    if named[o].in_features != nh * hd:
        return None
    kw = getattr(m, k).out_features
    if nh and (kw % hd or nh % (kw // hd)):
        return None
    kv = kw // hd if kw != nh * hd else 0
    if getattr(m, v).out_features != kw:
        return None
    swap = "shared_bias" if is_shared_bias_attention(m) else ""
    return AttentionUnit(
        unit_name, name, pre + q, pre + k, pre + v, o, nh, hd, attr, kv, tables=_tables(m, pre, nh), swap=swap
    )


def attention_units(model: nn.Module) -> list[AttentionUnit]:
    """Every attention block of `model` whose heads `find_groups` offers."""
    units, named = [], dict(model.named_modules())
    for name, m in named.items():
        if isinstance(m, nn.MultiheadAttention):
            if mha_prunable(m):
                pre = f"{name}." if name else ""
                units.append(
                    AttentionUnit(
                        name, name, name, name, name, pre + "out_proj", m.num_heads, m.head_dim, None, mha=True
                    )
                )
            continue
        u = _unit(name, m, named)
        if u is not None:
            units.append(u)
    return units


def unit_linears(model: nn.Module, u: AttentionUnit) -> dict[str, nn.Module]:
    """role → module: 'q', 'k', 'v' (or 'qkv') and 'o'."""
    if u.per_head:
        return {r: model.get_submodule(u.o if r == "o" else u.k if r == "kv" else u.q) for r in u.per_head}
    if u.fused or u.mha:
        return {"qkv": model.get_submodule(u.q), "o": model.get_submodule(u.o)}
    return {r: model.get_submodule(getattr(u, r)) for r in ("q", "k", "v", "o")}


def head_groups(model: nn.Module, unit: AttentionUnit) -> list[Group]:
    mods = unit_linears(model, unit)
    groups = []
    for h in range(unit.n_groups):
        rows, slices = unit.rows(h), []
        row_dim = 1 if unit.transposed else 0
        for role, r in rows.items():
            if role == "o":
                continue
            slices.append(Slice(unit.param(role, "weight"), row_dim, r))
            if (mods[role].in_proj_bias if unit.mha else mods[role].bias) is not None:
                slices.append(Slice(unit.param(role, "bias"), 0, r))
            bn = norm_of(model, unit.param(role, "weight")[: -len(".weight")]) if unit.swap == "levit" else None
            if bn:
                slices += [Slice(f"{bn}.weight", 0, r), Slice(f"{bn}.bias", 0, r)]
        slices.append(Slice(unit.param("o", "weight"), 1 - row_dim, rows["o"]))
        heads = tuple(range(h * unit.q_per_group, (h + 1) * unit.q_per_group))
        for t, dim in unit.tables:
            slices.append(Slice(t, dim, heads))
        groups.append(Group(name=f"{unit.name}:head{h}", kind="head", layer=unit.name, slices=slices, whole=unit.whole))
    return groups


def head_index(group_name: str) -> int:
    """The group number of a head group, from its name ('layer:head3' → 3)."""
    return int(group_name.rsplit(":head", 1)[1])
