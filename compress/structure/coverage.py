"""Layers find_groups does not analyse, named so that nothing is skipped silently."""

from __future__ import annotations

from torch import nn

from compress.structure.attention import is_conv1d

_KNOWN = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention)


def unanalysed_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, reason) for every module holding its own ≥2-d weight that is not a known layer type
    (GPT-2's Conv1D, a transposed Linear, is known: see `depgraph._conv1d_pruner`): its channels are
    never offered."""
    out = []
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if w is None or w.dim() < 2 or isinstance(m, _KNOWN) or is_conv1d(m):
            continue
        out.append((name, f"{type(m).__name__} is not an nn.Linear/nn.Conv layer, so its channels are not analysed"))
    return out


def nothing_found(model: nn.Module, n_layers: int) -> tuple[str, str]:
    """The entry for a model where every layer was skipped or refused."""
    return ("", f"no group found: all {n_layers} weight layers of {type(model).__name__} were skipped or refused")
