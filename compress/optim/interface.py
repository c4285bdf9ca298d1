"""What the training loop and the budget controller ask of an optimizer.

Every optimizer they can drive answers the same questions, so they never probe with
`hasattr`: the prox optimizers answer from their state (base.py), dense ones trivially
(dense.py), and a foreign torch optimizer is viewed through `as_structured`.
"""

from __future__ import annotations

import contextlib

import torch

Tensor = torch.Tensor


class StructuredOptimizer:
    """Mixin of the structured-sparsity questions; the defaults are the dense answers.

    `structured`: the run ends by committing Ŵ and recalibrating BatchNorm (dense runs end on W).
    `momentum_schedule`: the loop sets the averaging weight c every epoch (`set_momentum`).
    `frozen_state_keys()`: per-entry state buffers that must stay zero with a frozen group
    (`ZeroKeeper`), so a frozen entry's state never feeds a survivor's update.
    """

    structured = False  # trains a group lasso: its final point is Ŵ, with BatchNorm statistics recomputed for it
    momentum_schedule = False

    def structured_point(self):
        """Context in which the parameters hold the point that will be exported (Ŵ)."""
        return contextlib.nullcontext(self)

    def commit_structured_point(self, model: torch.nn.Module | None = None, data=None) -> None:
        """Make the structured point the parameters for good (before extraction); with `model` and its
        training `data`, recalibrate BatchNorm for it too (`recalibrate_for`)."""
        recalibrate_for(model, data)

    def group_norms(self) -> Tensor:
        """‖Ŵ_g‖₂ per group, in the order of the groups."""
        raise NotImplementedError

    def group_sparsity(self) -> tuple[float, float]:
        """(fraction of groups exactly zero, fraction of grouped entries inside zero groups) on Ŵ."""
        raise NotImplementedError

    def restart(self) -> None:
        """Start a new stage at a learning-rate decay; no-op for methods without stages."""

    def set_momentum(self, c: float) -> None:
        """Set the averaging weight c; only called when `momentum_schedule`."""

    def critical_lams(self) -> Tensor | None:
        """Per group, the λ above which the next step makes the group exactly zero; None when the
        zero test depends on the next gradient (the controller then adjusts λ multiplicatively)."""
        return None

    def frozen_state_keys(self) -> tuple[str, ...]:
        return ()

    @property
    def layer_picks(self) -> dict[str, int] | None:
        """Layer-wise methods (DSGD): how many steps updated each layer; None otherwise."""
        return None


def recalibrate_for(model: torch.nn.Module | None, data) -> None:
    """After the structured point Ŵ became the weights: BatchNorm running statistics still follow the
    point training moved (W), so `model` would read near chance (a BatchNorm CNN: 10.3% on digits) until
    they are recomputed on `data`. A BatchNorm model without `data` is refused, not left stale."""
    if model is None:
        if data is not None:
            from compress.errors import UserError

            raise UserError("`data` recalibrates BatchNorm of a `model`: give the model too", field="model")
        return
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_bn:
        return
    if data is None:
        from compress.errors import UserError

        raise UserError(
            "the model has BatchNorm layers whose running statistics belong to the trained point, not "
            "the structured one: give `data` (training batches) to recalibrate them",
            field="data",
        )
    from compress.train.evaluate import recalibrate_batchnorm  # a step of training, called at the optimizer's end

    param = next(model.parameters(), None)
    recalibrate_batchnorm(model, data, param.device if param is not None else torch.device("cpu"))


class GroupsFromModel:
    """Group norms and sparsity read from the parameters themselves (the iterate is the structured point)."""

    groups: list | None = None

    @torch.no_grad()
    def group_norms(self) -> Tensor:
        from compress.structure.sparsity import group_norms

        return group_norms(self.groups or [])

    @torch.no_grad()
    def group_sparsity(self) -> tuple[float, float]:
        from compress.structure.sparsity import group_sparsity

        return group_sparsity(self.groups or [])


class _ForeignView(GroupsFromModel, StructuredOptimizer):
    """A torch optimizer from outside this package, answered as a dense one."""

    def __init__(self, opt: torch.optim.Optimizer, groups):
        self.opt, self.groups = opt, groups

    def frozen_state_keys(self) -> tuple[str, ...]:
        return ("w_hat", "w0", "exp_avg", "exp_avg_sq")


def as_structured(opt, groups=None) -> StructuredOptimizer:
    """`opt` itself when it answers the interface, else a dense view of it over `groups`.

    Only the questions go through the view; stepping and state stay with `opt`.
    """
    return opt if isinstance(opt, StructuredOptimizer) else _ForeignView(opt, groups)
