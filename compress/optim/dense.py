"""Dense AdamW answering the structured-optimizer questions trivially (no Ŵ, no stages).

Named `AdamW` so run logs read as before; `CosineAdamW` is the budget run's final phase.
"""

from __future__ import annotations

import math

import torch

from compress.optim.interface import GroupsFromModel, StructuredOptimizer


class AdamW(GroupsFromModel, StructuredOptimizer, torch.optim.AdamW):
    """torch.optim.AdamW; `groups` only serve the sparsity report (the iterate is the structured point)."""

    def __init__(self, params, lr: float = 1e-3, groups=None, **kw):
        super().__init__(params, lr=lr, **kw)
        self.groups = groups

    def frozen_state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")


class CosineAdamW(AdamW):
    """AdamW whose lr follows a cosine from `lr` to 0 over `total_steps` of its own steps.

    The budget run's final phase owns its schedule: every step sets the lr from AdamW's own step
    count (overriding the training loop's per-epoch lr), so a checkpoint restores the position exactly."""

    def __init__(self, params, lr: float, total_steps: int, weight_decay: float = 1e-4, groups=None):
        super().__init__(params, lr=lr, weight_decay=weight_decay, groups=groups)
        self.base_lr, self.total_steps = float(lr), max(1, int(total_steps))

    def lr_at(self, k: int) -> float:
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(k, self.total_steps) / self.total_steps))

    def step(self, closure=None):
        k = next((int(st["step"]) for st in self.state.values() if "step" in st), 0)
        for g in self.param_groups:
            g["lr"] = self.lr_at(k)
        return super().step(closure)
