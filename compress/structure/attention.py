"""Attention units: the heads of an attention block as removable groups."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.structure.group import Group, Slice

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


def is_linear(m) -> bool:
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
        names = next((c for c in _QKVO if all(is_linear(getattr(m, x, None)) for x in c)), None)
        if names:
            units.append(AttentionUnit(name, name, *(pre + c for c in names), nh, hd, heads_attr))
            continue
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = named.get(parent_name)
        out = getattr(getattr(parent, "output", None), "dense", None)
        if name and all(is_linear(getattr(m, c, None)) for c in ("query", "key", "value")) and is_linear(out):
            pp = f"{parent_name}." if parent_name else ""
            units.append(
                AttentionUnit(parent_name, name, pre + "query", pre + "key", pre + "value", pp + "output.dense", nh, hd, heads_attr)
            )
    return units


def head_groups(model: nn.Module, unit: AttentionUnit) -> list[Group]:
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
