"""The randomized zero-invariance check `find_groups` runs before it offers any group.

The static analysis (zero_invariance.py) can miss a path that does not keep zero at zero
(a hand-written normalisation, a per-head table read elsewhere, a reshape that hard-codes a
width). A user must not learn that after hours of training, so the groups are tried at
find time, the way extraction will treat them: on a copy of the model whose exactly-zero
parameters are given random values (so nothing passes by accident), zero a random half of
every layer's groups, then all of them, remove them as `extract` does and compare outputs.
On a mismatch the layers are bisected and the culprits' groups dropped with the reason.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from compress.structure.group import GroupList, bind_groups
from compress.structure.tensors import as_args


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A copy in eval mode whose exactly-zero parameter entries are random (N(0, 0.02²))."""
    base = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            z = p == 0
            if bool(z.any()):
                p[z] = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02).to(p.dtype)[z]
    return base


def _trial(base, groups, chosen, args, kwargs, atol) -> str | None:
    """None if removing the groups `chosen` (zeroed first) keeps the output; else why not."""
    from compress.deploy.extract import (  # deploy sits above; lazy
        _compare,
        _ok,
        _outputs,
        _plan,
        _remove,
    )

    work = copy.deepcopy(base)
    gl = bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in groups]), work)
    zero = torch.zeros(len(gl), dtype=torch.bool)
    with torch.no_grad():
        for i in chosen:
            zero[i] = True
            for s, t in zip(gl[i].slices, gl[i].tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices, dtype=torch.long), 0.0)
    try:
        ref = _outputs(work, args, kwargs)
        plan = _plan(work, gl, zero)
        _remove(work, gl, plan, list(plan), args, kwargs)
        diff, scale = _compare(ref, _outputs(work.eval(), args, kwargs))
    except Exception as e:  # noqa: BLE001 - a removal that breaks the forward is the finding
        return f"removing them breaks the forward pass ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if _ok(diff, scale, atol):
        return None
    return f"removing zeroed groups changes the output (max diff {diff:.2g} at output scale {scale:.2g})"


def _bad_layers(base, groups, by_layer, layers, pattern, args, kwargs, atol) -> list[tuple[str, str]]:
    """The layers (with reasons) whose groups fail under `pattern`, by bisection."""
    why = _trial(base, groups, [i for ly in layers for i in pattern[ly]], args, kwargs, atol)
    if why is None:
        return []
    if len(layers) == 1:
        return [(layers[0], why)]
    mid = len(layers) // 2
    bad = _bad_layers(base, groups, by_layer, layers[:mid], pattern, args, kwargs, atol)
    bad += _bad_layers(base, groups, by_layer, layers[mid:], pattern, args, kwargs, atol)
    return bad or [(ly, f"{why}, only together with the other layers of this set") for ly in layers]


def check_groups(model: nn.Module, groups, example_inputs, seed: int = 0, atol: float = 1e-5):
    """(groups that pass, [(layer, reason)] for the layers dropped) — see the module docstring."""
    if not len(groups):
        return groups, []
    args, kwargs = as_args(example_inputs)
    base = _perturbed(model, seed)
    gen = torch.Generator().manual_seed(seed)
    dropped: list[tuple[str, str]] = []
    keep = list(groups)
    for rnd in ("half", "all"):
        by_layer: dict[str, list[int]] = {}
        for i, g in enumerate(keep):
            by_layer.setdefault(g.layer, []).append(i)
        pattern = {}
        for layer, idx in by_layer.items():
            if rnd == "all":
                pattern[layer] = idx
            else:
                perm = torch.randperm(len(idx), generator=gen)[: max(1, len(idx) // 2)]
                pattern[layer] = [idx[j] for j in perm.tolist()]
        bad = _bad_layers(base, keep, by_layer, list(by_layer), pattern, args, kwargs, atol)
        if bad:
            gone = {ly for ly, _ in bad}
            which = "half of its groups" if rnd == "half" else "all of its groups"
            dropped += [(ly, f"randomized check at find time, {which} zeroed: {why}") for ly, why in bad]
            keep = [g for g in keep if g.layer not in gone]
    return GroupList(keep, list(getattr(groups, "not_prunable", [])) + dropped), dropped
