"""T5-style attention: one position bias, computed by the first block, shared by every block.

T5's first self-attention block turns its `relative_attention_bias` Embedding(buckets, heads)
into a [1, heads, q, k] bias, adds it to its scores and *returns* it; the stack passes it to
every later block, which adds it as it is. A block that lost heads would add a bias with the
original head count. So after head removal each block keeps `kept_heads` (the original head
numbers it still has) and its forward is replaced by `_forward_kept_heads`: it computes the
full bias when none is given (the Embedding stays full-width: later blocks read every head of
it), adds only its kept heads' rows, and passes the full bias on. The replacement is an
instance attribute reading plain attributes, so it survives deepcopy and exports to ONNX as a
Gather; `kept_heads` is a list of ints, saved with the other module attributes.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

_SIGNATURE = ["self", "hidden_states", "mask", "key_value_states", "position_bias"]


def is_shared_bias_attention(m: nn.Module) -> bool:
    """A T5Attention (or a copy of it: MT5, …): `compute_bias`, `has_relative_attention_bias` and
    forward(hidden_states, mask, key_value_states, position_bias, …) returning the bias it used."""
    if not (callable(getattr(m, "compute_bias", None)) and isinstance(getattr(m, "n_heads", None), int)):
        return False
    if not isinstance(getattr(m, "has_relative_attention_bias", None), bool):
        return False
    params = list(inspect.signature(type(m).forward).parameters)
    return params[: len(_SIGNATURE)] == _SIGNATURE


def keep_heads(m: nn.Module, removed: list[int]) -> None:
    """Make `m` add only the rows of its remaining heads to the shared bias (call before its
    head count changes; `removed` counts among the heads it has now)."""
    current = list(getattr(m, "kept_heads", range(m.n_heads)))
    if not hasattr(m, "bias_heads"):
        m.bias_heads = m.n_heads  # the shared bias's width
    gone = set(removed)
    m.kept_heads = [h for i, h in enumerate(current) if i not in gone]
    install(m)


def install(m: nn.Module) -> None:
    """Set the replacement forward on `m` (also after loading a saved model: its attributes say which)."""
    m.forward = types.MethodType(_forward_kept_heads, m)


def reinstall(model: nn.Module) -> None:
    """After `load_compressed` restored the attributes: the replacement forward of every block that has `kept_heads`."""
    for m in model.modules():
        if isinstance(getattr(m, "kept_heads", None), list) and is_shared_bias_attention(m):
            install(m)


def _full_bias(m, hidden_states, key_value_states, cache) -> torch.Tensor:
    """The [1, bias_heads, q, k] bias the original block would have computed with all its heads."""
    q_len = hidden_states.shape[1]
    past = cache.get_seq_length(m.layer_idx) if cache is not None else 0
    k_len = key_value_states.shape[1] if key_value_states is not None else past + q_len
    if m.has_relative_attention_bias:
        return m.compute_bias(q_len, k_len, device=hidden_states.device, past_seen_tokens=past)
    return torch.zeros((1, m.bias_heads, q_len, k_len), device=hidden_states.device, dtype=hidden_states.dtype)


def _forward_kept_heads(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kw):
    if position_bias is None:
        position_bias = _full_bias(self, hidden_states, key_value_states, cache)
    rows = torch.tensor(self.kept_heads, dtype=torch.long, device=position_bias.device)
    out = type(self).forward(
        self, hidden_states, mask, key_value_states, position_bias.index_select(1, rows), cache=cache, **kw
    )
    return (out[0], position_bias, *out[2:])
