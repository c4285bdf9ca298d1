"""Each attention block's heads tried alone, at find time, on the inputs the block saw.

A block can match a recognised layout yet compute something removal breaks (a head size
read from the input width, a per-head tensor shared across blocks — the forms this package
adapts are listed on AttentionUnit; an unknown variant is caught here). The whole-model
randomized check (`soundness.py`) finds this too, but by bisection over every layer, which
cost minutes on full-size Swin; one head removed from a copy of one block costs a forward
of that block. Blocks of a form `no_heads` can remove whole are also tried with every head
removed; only when that is exact do their groups say so (`whole`), for extraction and the
cost model to remove the block entirely.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from compress.structure.attention import AttentionUnit, head_groups
from compress.structure.group import GroupList, bind_groups
from compress.structure.no_heads import whole_form
from compress.structure.tensors import as_args, flatten_tensors


def _relative(u: AttentionUnit) -> AttentionUnit:
    """The unit with names relative to a holder whose child "m" is its block (so a removal that
    replaces the block, as for nn.MultiheadAttention, can be tried too)."""
    cut = len(u.name)

    def rel(n):
        return "m" + n[cut:]

    return dataclasses.replace(
        u,
        name="m",
        holder=rel(u.holder),
        q=rel(u.q),
        k=rel(u.k),
        v=rel(u.v),
        o=rel(u.o),
        tables=[(rel(t), d) for t, d in u.tables],
    )


def _capture(model, units, example_inputs) -> dict:
    """unit name → (args, kwargs) of the block's first call on the example."""
    seen, hooks = {}, []
    for u in units:

        def hook(mod, args, kwargs, _n=u.name):
            seen.setdefault(_n, (args, kwargs))

        hooks.append(model.get_submodule(u.name).register_forward_pre_hook(hook, with_kwargs=True))
    args, kwargs = as_args(example_inputs)
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen


def _outputs(block, args, kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.float() for t in flatten_tensors(block(*args, **kwargs)) if t.is_floating_point()]


def _per_head(a: torch.Tensor, b: torch.Tensor, u: AttentionUnit, gone: int) -> bool:
    """Is b a per-head output (attention probabilities) of a with `gone` groups' heads removed?"""
    if a.dim() != b.dim():
        return False
    diff = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
    return len(diff) == 1 and a.shape[diff[0]] == u.num_heads and b.shape[diff[0]] == u.num_heads - gone * u.q_per_group


def _try_heads(block: nn.Module, u: AttentionUnit, args, kwargs, atol: float, every: bool = False) -> str | None:
    """None if removing one head (every head: `every`) of the zeroed block keeps its output; else why not."""
    from compress.deploy.extract import _remove_heads  # deploy sits above; lazy

    holder = nn.Module()
    holder.m = copy.deepcopy(block)
    holder.m.eval()  # not chained: timm LeViT's train() returns None
    what = "every head" if every else "one head"
    gl = bind_groups(GroupList(head_groups(holder, u)[: None if every else 1]), holder)
    with torch.no_grad():
        for g in gl:
            for s, t in zip(g.slices, g.tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices, dtype=torch.long), 0.0)
    try:
        ref = _outputs(holder.m, args, kwargs)
        _remove_heads(holder, u, list(gl), u.name)
        got = _outputs(holder.m, args, kwargs)
    except Exception as e:  # noqa: BLE001 - a removal that breaks the forward is the finding
        return f"removing {what} breaks its forward ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if every:  # attention probabilities [B, heads, Lq, Lk] are gone with the heads (None); compare the rest
        ref, got = ([t for t in ts if not (t.dim() == 4 and t.shape[1] in (u.num_heads, 0))] for ts in (ref, got))
    if len(ref) != len(got) or any(a.shape != b.shape and not _per_head(a, b, u, len(gl)) for a, b in zip(ref, got)):
        return f"removing {what} changes the shape of its output"
    pairs = [(a, b) for a, b in zip(ref, got) if a.shape == b.shape and a.numel()]
    if not pairs:
        return "no output of the block keeps its shape"
    scale = max(float(a.abs().max()) for a, _ in pairs) or 1.0
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    return None if diff <= atol * scale else f"removing {what}, zeroed, changes its output (max diff {diff:.2g})"


def check_units(model: nn.Module, units: list[AttentionUnit], example_inputs, atol: float = 1e-5):
    """(units whose one-head removal is exact on the example, [(unit name, reason)] for the rest).

    A unit whose block `no_heads` knows how to remove whole comes back with `whole` set when
    removing every head is exact on the example too (else extraction keeps one head of it).
    nn.MultiheadAttention units (replaced by this package's own module) and the root pass the
    one-head check as they are."""
    todo = [u for u in units if u.name and u.n_groups and model.get_submodule(u.name) is not model]
    seen = _capture(model, todo, example_inputs) if todo else {}
    ok, refused = [], []
    for u in units:
        if u not in todo or (u.mha and u.name not in seen):
            ok.append(u)
            continue
        if u.name not in seen:
            refused.append((u.name, "attention block not reached by the forward pass on the example inputs"))
            continue
        (args, kwargs), block, rel = seen[u.name], model.get_submodule(u.name), _relative(u)
        why = None if u.mha else _try_heads(block, rel, args, kwargs, atol)
        if why is not None:
            refused.append((u.name, f"heads not offered: {why}"))
            continue
        whole = whole_form(model, u) is not None and _try_heads(block, rel, args, kwargs, atol, every=True) is None
        ok.append(dataclasses.replace(u, whole=whole))
    return ok, refused
