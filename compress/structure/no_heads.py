"""A whole attention block removed: when every head is zero, its output is the out projection's bias.

With all q, k, v rows and out-projection columns zero, each head's values are zero, so the
block returns o(0) = o.bias at every position, whatever the input. Extraction then removes
every head (q/k/v keep no rows, the out projection no columns: nothing is computed) and
sets the forward of the module that returned the projection to `bias` broadcast to the
input's leading dims. The module keeps its class, parameter names and a `heads_removed`
attribute naming the form, so a saved model is restored by `reinstall`.

Forms (`whole_form`), where the module's return value is known:
* "mha": nn.MultiheadAttention → (bias, attention weights: uniform over the keys the masks keep);
* "proj:<child>": a block returning child(…) directly — timm's fused-qkv attention (no norm
  before the projection), torchvision Swin and MaxViT, this package's `SelfAttention`;
* "hf_self" + "linear": Hugging Face BERT-style, where `.self` returns (context, weights) and
  `.output.dense` projects: `.self` passes its input through, `.output.dense` returns its bias;
* "hf_out:<child>": a Hugging Face block returning (child(…), weights) — LLaMA/Mistral/Qwen2
  (grouped-query too), DistilBERT, GPT-2 (`Conv1D`) — returns (bias, None).
A form is only a candidate: `head_check` removes every head of the block on its own inputs and
only a block that stays exact may go whole (`Group.whole`; ALBERT, whose block also adds the
residual and normalises, and MobileViT, whose `.self` returns a tensor, keep one head). T5's
shared position bias and LeViT keep one head.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from compress.structure.mha import additive_mask

_PROJ_BLOCKS = ("compress.models.transformer.SelfAttention",)


def whole_form(model: nn.Module, unit) -> str | None:
    """How the block of `unit` (an AttentionUnit) returns its output when no head is left, or None."""
    m = model.get_submodule(unit.name)
    if unit.mha:
        return "mha"
    if unit.swap in ("shared_bias", "levit"):
        return None
    hf = type(model.get_submodule(unit.holder)).__module__.startswith("transformers.")
    if unit.name != unit.holder:
        return "hf_self" if hf and unit.o.endswith(".dense") and not unit.transposed else None
    if hf:
        return "hf_out:" + unit.o.rsplit(".", 1)[-1]
    if unit.transposed or unit.kv_heads:
        return None
    if not isinstance(getattr(m, "norm", None), (nn.Identity, type(None))):
        return None  # a norm between the heads and the projection: o(norm(0)) is not o's bias
    cls = f"{type(m).__module__}.{type(m).__name__}"
    if (unit.fused and (cls.startswith("timm.") or unit.swap in ("swin", "maxvit"))) or cls in _PROJ_BLOCKS:
        return "proj:" + unit.o.rsplit(".", 1)[-1]
    return None


def mark(work: nn.Module, unit, form: str) -> None:
    """After every head's rows and columns are gone: set the constant forwards."""
    if form == "hf_self":
        _set(work.get_submodule(unit.holder), "hf_self")
        _set(work.get_submodule(unit.o), "linear")
    else:
        _set(work.get_submodule(unit.name), form)


def reinstall(model: nn.Module) -> None:
    """The constant forwards of every module a saved model marks with `heads_removed`."""
    for m in model.modules():
        if isinstance(getattr(m, "heads_removed", None), str):
            _set(m, m.heads_removed)


def _set(m: nn.Module, form: str) -> None:
    m.heads_removed = form
    fn = {"mha": _mha, "hf_self": _passthrough, "linear": _linear}.get(form)
    fn = fn or (_hf_out if form.startswith("hf_out:") else _proj)
    m.forward = types.MethodType(fn, m)


def _bias_like(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """lin's output on a zero input with x's leading dims: its bias (or zeros) broadcast."""
    width = lin.out_features if isinstance(lin, nn.Linear) else lin.nf  # GPT-2's Conv1D: nf
    out = x.new_zeros((*x.shape[:-1], width))  # a new tensor, not a view of the parameter
    return out if lin.bias is None else out + lin.bias


def _proj(self, x, *args, **kwargs):
    return _bias_like(getattr(self, self.heads_removed.split(":", 1)[1]), x)


def _hf_out(self, hidden_states, *args, **kwargs):
    return _bias_like(getattr(self, self.heads_removed.split(":", 1)[1]), hidden_states), None


def _linear(self, x):
    return _bias_like(self, x)


def _passthrough(self, hidden_states, *args, **kwargs):
    return hidden_states, None


def _mha(
    self,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    out = _bias_like(self.out_proj, query)
    if not need_weights:
        return out, None
    batched, bf = query.dim() == 3, self.batch_first
    n = (query.shape[0] if bf else query.shape[1]) if batched else 1
    lq, s = (query.shape[-2], key.shape[-2]) if batched and bf else (query.shape[0], key.shape[0])
    if key_padding_mask is not None and key_padding_mask.dim() == 1:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    scores = query.new_zeros((n, 1, lq, s))
    attn = (scores + additive_mask(attn_mask, key_padding_mask, scores, is_causal)).softmax(-1)
    weights = attn.mean(1) if average_attn_weights else attn[:, :0]
    return out, weights if batched else weights.squeeze(0)
