"""The Group: (parameter, dim, indices) slices that are removed together; serialization to JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from compress.errors import UserError
from compress.files import atomic_write_json


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
    kind: str  # "channel" | "head" | "neuron" | "convgroup" (a whole group of a grouped conv)
    layer: str  # the module whose output structure is removed
    slices: list[Slice]
    weight: float = 1.0
    tensors: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)
    dependents: list[Slice] = field(default_factory=list, repr=False)
    whole: bool = False  # its layer may lose every group (an attention block checked to go whole at find time)

    @property
    def size(self) -> int:
        """Number of parameter entries in the group (the regularized slices only)."""
        if not self.tensors:
            raise ValueError(f"group {self.name} is not bound to a model; call bind_groups")
        return sum(slice_numel(s, t.shape) for s, t in zip(self.slices, self.tensors))

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
        if self.whole:
            d["whole"] = True
        return d

    @staticmethod
    def from_json(d: dict) -> Group:
        def sl(rows):
            return [Slice(p, int(dim), tuple(int(i) for i in idx)) for p, dim, idx in rows]

        return Group(
            name=d["name"],
            kind=d["kind"],
            layer=d["layer"],
            weight=float(d["weight"]),
            slices=sl(d["slices"]),
            dependents=sl(d.get("dependents", [])),
            whole=bool(d.get("whole", False)),
        )


class GroupList(list):
    """A list of `Group`s plus `not_prunable`: (layer, reason) for structures not offered."""

    def __init__(self, groups=(), not_prunable=()):
        super().__init__(groups)
        self.not_prunable: list[tuple[str, str]] = list(not_prunable)

    def __getstate__(self):  # copies/pickles drop the sparsity index cache (it holds live tensors)
        return {k: v for k, v in self.__dict__.items() if k != "_index"}


def slice_numel(s: Slice, shape) -> int:
    return len(s.indices) * math.prod(d for i, d in enumerate(shape) if i != s.dim)


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
        groups = GroupList(
            [Group.from_json(d) for d in data["groups"]], [tuple(x) for x in data.get("not_prunable", [])]
        )
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
