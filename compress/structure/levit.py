"""timm LeViT's attention: heads interleaved in a Linear+BatchNorm, a per-head bias table.

`Attention` projects q, k, v with one `LinearNorm` (Linear without bias, then BatchNorm1d)
whose output is viewed as [heads, key_dim + key_dim + val_dim]: head h owns a contiguous
block of rows, q, k and v inside it. `AttentionDownsample` has `kv` ([heads, key_dim +
val_dim]) and `q` (a subsampling then a LinearNorm, [heads, key_dim]). The out projection
is `proj` = (Hardswish, LinearNorm): a zero head's values stay zero through Hardswish, so its
input columns can go. A head group is its rows of each LinearNorm (Linear rows and the
BatchNorm's γ, β: with both zero the BatchNorm outputs zero whatever its statistics), the
out projection's columns and its row of `attention_biases`. The convolutional variant
(`use_conv`) is not matched.
"""

from __future__ import annotations

from torch import nn


def levit_layout(name: str, m: nn.Module) -> dict | None:
    """AttentionUnit fields for a LeViT attention block, or None for anything else."""
    cls = type(m)
    if not cls.__module__.startswith("timm.models.levit") or cls.__name__ not in ("Attention", "AttentionDownsample"):
        return None
    if getattr(m, "use_conv", True):
        return None
    pre = f"{name}." if name else ""
    nh, kd, vd = m.num_heads, m.key_dim, m.val_dim
    fields = dict(o=pre + "proj.ln.linear", num_heads=nh, head_dim=kd, heads_attr="num_heads")
    fields |= dict(tables=[(pre + "attention_biases", 0)], swap="levit")
    if cls.__name__ == "Attention":
        q = k = pre + "qkv.linear"
        per_head = {"qkv": 2 * kd + vd, "o": vd}
    else:
        q, k = pre + "q.ln.linear", pre + "kv.linear"
        per_head = {"q": kd, "kv": kd + vd, "o": vd}
    return fields | dict(q=q, k=k, v=k, per_head=per_head)


def norm_of(model: nn.Module, linear: str) -> str | None:
    """The BatchNorm of the LinearNorm whose Linear is `linear` ('x.linear' → 'x.bn')."""
    parent, _, leaf = linear.rpartition(".")
    bn = f"{parent}.bn" if parent else "bn"
    try:
        mod = model.get_submodule(bn)
    except AttributeError:
        return None
    return bn if leaf == "linear" and isinstance(mod, nn.BatchNorm1d) else None


def set_levit_widths(m: nn.Module, heads: int) -> None:
    """The widths LeViT's forward reads, for `heads` heads."""
    m.key_attn_dim = heads * m.key_dim
    m.val_attn_dim = heads * m.val_dim


def keep_cached_biases(m: nn.Module, keep) -> None:
    """LeViT caches the expanded bias table in eval mode: keep the rows of the kept heads (as
    computed, so the block computes exactly what it did)."""
    cache = getattr(m, "attention_bias_cache", None)
    if isinstance(cache, dict):
        m.attention_bias_cache = {k: v.index_select(0, keep.to(v.device)) for k, v in cache.items()}
