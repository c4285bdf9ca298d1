"""Removable structures ("groups"): found once, used by the regularizer and by extraction.

A group is *zero-invariant*: when every slice in it is zero, deleting the structure
leaves the network's output unchanged. Regularization (optimizers) and extraction
both read the same `Group` objects so they can never disagree on what a group is.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


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

    @property
    def size(self) -> int:
        """Number of parameter entries in the group."""
        total = 0
        for s in self.slices:
            shape = self.tensors[self.slices.index(s)].shape if self.tensors else None
            if shape is None:
                raise ValueError(f"group {self.name} is not bound to a model; call bind_groups")
            total += len(s.indices) * math.prod(d for i, d in enumerate(shape) if i != s.dim)
        return total

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "weight": self.weight,
            "slices": [[s.param, s.dim, list(s.indices)] for s in self.slices],
        }

    @staticmethod
    def from_json(d: dict) -> "Group":
        return Group(
            name=d["name"],
            kind=d["kind"],
            layer=d["layer"],
            weight=float(d["weight"]),
            slices=[Slice(p, int(dim), tuple(int(i) for i in idx)) for p, dim, idx in d["slices"]],
        )
