"""The λ controller: drives the structured point's cost to the budget, then freezes the pattern."""

from __future__ import annotations

import math

import torch

from compress.budget.align_decision import measured_alignment
from compress.budget.critical import KindBalance, lam_on_plan
from compress.budget.patterns import ZeroKeeper, align_widths, enforce, revive
from compress.budget.settings import default_freeze_epoch
from compress.budget.target import Budget
from compress.errors import UserError
from compress.optim.dense import CosineAdamW
from compress.optim.interface import as_structured
from compress.structure.cost_model import CostModel, simd_block


def _structured_zero(opt, groups) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero mask, ‖Ŵ_g‖) of the structured point (the optimizer's Ŵ, or W for dense ones)."""
    norms = as_structured(opt, groups).group_norms().cpu()
    return norms == 0, norms


LAM0_FALLBACK = 1e-4  # the controller's first λ when the config's is 0 (it adapts λ from there)


class BudgetController:
    """Drives the structured point's cost to the target by the freeze epoch, then keeps the
    frozen zero pattern exactly zero while the survivors train with λ = `final_lam`.

    Sparsity phase (epochs before `freeze_epoch`): after the first step and `controls_per_epoch`
    times per epoch, λ is set for a planned cost p(s) = T + (1 − T)(1 − s)³ (the gradual
    pruning schedule of Zhu & Gupta, reaching T at `plan_end` of the phase). Dual averaging
    (RAMDA, RMDA and their variants: `opt.critical_lams()`): λ is the smallest value whose zero
    pattern at the current dual state costs ≤ p — exact, so the cost tracks the plan instead of
    oscillating around it (a multiplicative rule did: the cost of Ŵ falls off a cliff over a 2×
    range of λ). With several kinds of group (attention heads and MLP neurons) and `balance_kinds`
    (default), λ is one per kind: each kind's w_g is scaled by its median λ*_g (`critical.py`;
    all-MiniLM-L6-v2 at 0.5 FLOPs otherwise lost 65 of 72 heads first). Other
    optimizers: λ is multiplied by exp(gain·(c − p)/(1 − T)), at most `max_factor`, when the
    cost c is above plan, divided likewise when c < T − tol, held otherwise.

    Freeze (end of epoch `freeze_epoch` − 1): Ŵ is committed into the parameters; if the cost
    is above T, `enforce` removes the weakest groups; if it is below T − tol, `revive` gives
    back the zero groups whose iterate W is strongest (RAMDA's W keeps their values) while the
    cost stays ≤ T. Then `align_widths` makes every channel/neuron width a multiple of `align`
    (default `simd_block()`; 1 = off) at a cost still ≤ T, and for FLOP/parameter targets ≥ T −
    `align_window` (else a smaller alignment, else none); for a latency target at no more blocked
    FLOPs than the settled pattern. With `align_meter` (finetune_to_budget's default) the aligned widths
    are then measured against the unaligned ones, per layer, and kept only where they measure faster
    (`measured_alignment`; the report lands in freeze_info["alignment"]["measured"]). Then a new optimizer stage starts (`restart`, when the next
    epoch is not already a milestone; `restart_at_freeze=False` skips it), λ = `final_lam` (None: keep λ),
    and `on_step` re-zeroes the frozen groups in the parameters and the optimizer's Ŵ / W⁰
    after every step. Best with an lr decay at the freeze epoch (finetune_to_budget's default).

    `rewind="init"` (with the AdamW final phase): at the freeze the whole model is reset to
    `rewind_weights` (a state dict, or a callable returning one: the weights the run started from),
    the frozen groups zeroed and BatchNorm recalibrated, so AdamW trains the chosen structure from the
    dense weights instead of the group lasso's shrunken survivors (all-MiniLM-L6-v2 distillation: the
    median encoder matrix ended at 0.24 of its dense norm).

    `final_optimizer="adamw"` (default): the final phase trains the frozen structure with
    `CosineAdamW` (`final_lr` → 0, weight decay `final_weight_decay`) instead of RAMDA at λ = 0 —
    the peers' fine-tuning routine, on the same architecture; the frozen groups and their Adam
    moments are re-zeroed after every step, and the exported point is the final W. "same": RAMDA
    at λ = `final_lam` as above. digits-resnet from a 99.78% dense model, 30 epochs, freeze at 22,
    seeds 0-2: adamw 99.1-99.8% at 0.3 of the FLOPs (RAMDA 92.4-98.4%, swinging up to 10 points
    from epoch to epoch), 87-95% at 0.1 (RAMDA 71-77%), same widths and ORT speedups.
    """

    def __init__(
        self,
        budget: Budget,
        cost_model: CostModel,
        groups,
        cfg,
        steps_per_epoch: int,
        *,
        target: float | None = None,
        kind: str | None = None,
        lam0: float | None = None,
        freeze_epoch: int | None = None,
        plan_end: float = 0.8,
        controls_per_epoch: int = 4,
        gain: float = 4.0,
        max_factor: float = 2.0,
        tol: float = 0.02,
        revive: bool = True,
        final_lam: float | None = 0.0,
        restart_at_freeze: bool = True,
        exact: bool = True,
        align: int | None = None,
        align_window: float = 0.05,
        final_optimizer: str = "adamw",
        final_lr: float = 1e-3,
        final_weight_decay: float = 1e-4,
        rewind: str = "none",
        rewind_weights=None,
        latency=None,
        bn_data=None,
        log=None,
        align_meter=None,
        balance_kinds: bool = True,
    ):
        self.budget, self.cm, self.groups, self.cfg = budget, cost_model, groups, cfg
        self.kind = kind or ("flops_blocked" if budget.kind == "latency" else budget.kind)
        self.target = float(target if target is not None else budget.target)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.lam0 = float(lam0 if lam0 else ((cfg.lam or 0) if (cfg.lam or 0) > 0 else LAM0_FALLBACK))
        self.freeze_epoch = int(freeze_epoch if freeze_epoch is not None else default_freeze_epoch(cfg, rewind))
        if not 1 <= self.freeze_epoch <= cfg.epochs:
            raise UserError(
                f"`freeze_epoch` {self.freeze_epoch} is outside 1..{cfg.epochs} (the run's epochs)",
                field="freeze_epoch",
            )
        self.plan_end, self.controls, self.gain = plan_end, max(1, controls_per_epoch), gain
        self.max_factor, self.tol, self.do_revive, self.final_lam = max_factor, tol, revive, final_lam
        self.exact, self.restart_at_freeze = exact, restart_at_freeze
        self.align = simd_block() if align is None else int(align)
        if self.align < 1:
            raise UserError(f"`align` must be ≥ 1 (1 = no alignment), got {align}", field="align")
        self.align_window = align_window
        self.align_meter = align_meter  # meter(mask, tag) → latency/dense: alignment stays where it measures faster
        if final_optimizer not in FINAL_OPTIMIZERS:
            raise UserError(
                f"`final_optimizer` must be {' or '.join(FINAL_OPTIMIZERS)}, got {final_optimizer!r}",
                field="final_optimizer",
            )
        self.final_optimizer, self.final_lr, self.final_weight_decay = final_optimizer, final_lr, final_weight_decay
        if rewind not in REWINDS:
            raise UserError(f"`rewind` must be {' or '.join(REWINDS)}, got {rewind!r}", field="rewind")
        if rewind != "none" and final_optimizer != "adamw":
            raise UserError(
                "`rewind` init restarts the survivors from the starting weights for the AdamW final phase; "
                "it needs `final_optimizer` adamw",
                field="rewind",
                fields=("final_optimizer",),
            )
        self.rewind, self.rewind_weights = rewind, rewind_weights
        self.latency, self.bn_data, self.log = latency, bn_data, log or (lambda msg: None)
        self.step = 0
        self.frozen: torch.Tensor | None = None
        self.keeper: ZeroKeeper | None = None
        self.counts = {"removed_by_optimizer": 0, "removed_by_enforcement": 0, "removed_by_alignment": 0, "revived": 0}
        self.history: list[dict] = []
        self.freeze_info: dict = {}
        self._measured_mid = False
        self.balance = KindBalance(groups) if balance_kinds else None

    # ---- plan and control

    def planned(self, epochs_done: float) -> float:
        s = min(1.0, epochs_done / max(1e-9, self.plan_end * self.freeze_epoch))
        return self.target + (1 - self.target) * (1 - s) ** 3

    def _lam(self, opt) -> float:
        return float(opt.param_groups[0].get("lam", 0.0))

    def _set_lam(self, opt, lam: float) -> None:
        for g in opt.param_groups:
            g["lam"] = lam

    def _control(self, opt, epochs_done: float) -> dict:
        """Set λ for the plan at `epochs_done` epochs: exactly (critical λ) when the optimizer allows,
        otherwise multiplicatively from the cost gap."""
        p = self.planned(epochs_done)
        crit = as_structured(opt, self.groups).critical_lams() if self.exact else None
        if crit is not None:
            if self.balance is not None:
                crit = self.balance.rebalance(opt, crit)
            lam, c = lam_on_plan(crit, p, lambda m: float(self.cm.cost(m, self.kind)), self.lam0)
            zero_n = int((crit <= lam).sum())
            how = "exact"
        else:
            zero, _ = _structured_zero(opt, self.groups)
            c = float(self.cm.cost(zero, self.kind))
            zero_n = int(zero.sum())
            lam = self._lam(opt)
            if lam <= 0:
                lam = self.lam0
            span = max(1e-6, 1 - self.target)
            if c > p:
                lam *= math.exp(min(self.gain * (c - p) / span, math.log(self.max_factor)))
            elif c < self.target - self.tol:
                lam *= math.exp(max(self.gain * (c - (self.target - self.tol / 2)) / span, -math.log(self.max_factor)))
            how = "multiplicative"
        self._set_lam(opt, lam)
        rec = {"at_epoch": round(epochs_done, 4), "cost": c, "plan": p, "lam": lam, "zero": zero_n, "rule": how}
        self.history.append(rec)
        return rec

    # ---- callbacks for compress.train.finetune

    def on_step(self, opt) -> None:
        self.step += 1
        if self.keeper is not None:
            self.keeper.apply(opt)
            return
        if self.step == 1 and self._lam(opt) <= 0:
            self._set_lam(opt, self.lam0)
        interval = max(1, self.steps_per_epoch // self.controls)
        in_epoch = self.step % self.steps_per_epoch
        if (
            self.step == 1 or in_epoch and in_epoch % interval == 0
        ) and self.step < self.freeze_epoch * self.steps_per_epoch:
            self._control(opt, self.step / self.steps_per_epoch)

    def on_epoch(self, state: dict) -> dict:
        """λ control in the sparsity phase; at the freeze epoch the freeze, and with
        `final_optimizer="adamw"` the switch: state["optimizer"] becomes the final phase's optimizer."""
        opt, epoch = state["optimizer"], int(state["epoch"])
        trained_by = type(opt).__name__
        self.step = (epoch + 1) * self.steps_per_epoch
        lam_used = self._lam(opt)
        if self.keeper is None and epoch + 1 < self.freeze_epoch:
            rec = self._control(opt, float(epoch + 1))
            phase = "sparsity"
            if self.latency is not None and not self._measured_mid and epoch + 1 >= self.plan_end * self.freeze_epoch:
                # the plan has reached the target: measure the pattern training converged to, refit, remap
                self._measured_mid = True
                zero, _ = _structured_zero(opt, self.groups)
                self.latency.measure(zero, tag=f"structured point, epoch {epoch + 1}")
                self.latency._refit()
                a, b = self.latency.fit
                self.target = float(
                    min(
                        max(
                            (self.budget.latency_ms / self.latency.dense_ms - a) / max(b, 1e-6),
                            self.latency.min_point["flops_blocked"],
                        ),
                        0.99,
                    )
                )
        else:
            if self.keeper is None:
                self.freeze(opt, state["model"], state.get("config"), epoch)
                if self.final_optimizer == "adamw":
                    opt = state["optimizer"] = self.make_final_optimizer(state["model"])
            rec = None
            phase = "final"
        zero, _ = _structured_zero(opt, self.groups)
        if self.frozen is not None:
            zero = zero | self.frozen  # revived groups' Ŵ is still zero until the next step
        out = {
            "cost": float(self.cm.cost(zero, self.kind)),
            "cost_flops": float(self.cm.cost(zero, "flops")),
            "cost_params": float(self.cm.cost(zero, "params")),
            "target": self.target,
            "phase": phase,
            "lam": lam_used,
            "lam_next": self._lam(opt),
            "groups_zero": int(zero.sum()),
            "optimizer": trained_by,
            **self.counts,
        }
        if rec is not None:
            out["plan"] = rec["plan"]
        return out

    def make_final_optimizer(self, model) -> CosineAdamW:
        """The final phase's AdamW over every trainable parameter, its cosine spanning the epochs after
        the freeze (also what a resumed run rebuilds before loading the checkpoint's state)."""
        steps = (self.cfg.epochs - self.freeze_epoch) * self.steps_per_epoch
        return CosineAdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=self.final_lr,
            total_steps=steps,
            weight_decay=self.final_weight_decay,
            groups=self.groups,
        )

    # ---- freeze: commit, enforce or revive, keep zero

    @torch.no_grad()
    def freeze(self, opt, model, cfg=None, epoch: int | None = None) -> dict:
        from compress.structure.sparsity import group_norms

        zero, norms = _structured_zero(opt, self.groups)
        iterate_norms = group_norms(self.groups).cpu()  # W (RAMDA: the averaged iterate) before committing
        n_opt = int(zero.sum())
        c0 = float(self.cm.cost(zero, self.kind))
        mask, added = enforce(self.cm, zero, norms, self.kind, self.target)
        if (
            self.do_revive
            and not bool(added.any())
            and c0 < self.target - self.tol
            and bool((iterate_norms[zero] > 0).any())
        ):
            mask, _ = revive(
                self.cm, zero, torch.where(zero, iterate_norms, torch.zeros_like(iterate_norms)), self.kind, self.target
            )
        info = {
            "epoch": None if epoch is None else epoch + 1,
            "cost_optimizer": c0,
            "zero_optimizer": n_opt,
            "lam_at_freeze": self._lam(opt),
        }
        if self.latency is not None:
            mask, info["latency"] = self.latency.settle(mask, norms, self)
        pre = mask  # the pattern before alignment (what the alignment removed is counted apart)
        if self.align > 1:
            if self.latency is None:  # FLOP/param target: aligned and still in [T − window, T]
                target, floor = self.target, self.target - self.align_window
            else:  # aligned widths never cost more blocked FLOPs than the settled pattern
                target, floor = float(self.cm.cost(mask, self.kind)), None
            mask, info["alignment"] = align_widths(
                self.cm, self.groups, mask, norms, iterate_norms, self.kind, target, self.align, floor=floor
            )
            if self.align_meter is not None and bool((mask != pre).any()):
                mask, info["alignment"]["measured"] = measured_alignment(
                    self.cm, pre, mask, self.kind, target, self.align_meter, floor=floor, log=self.log
                )
                info["alignment"]["widths"] = info["alignment"]["measured"]["chosen"]["widths"]
                if not bool((mask != pre).any()):
                    info["alignment"]["align"] = 1
        added, revived = mask & ~zero, zero & ~mask
        self._commit(opt, revived)
        if self.rewind == "init":
            self._rewind(model)
            info["rewound_to"] = "init"
        self.keeper = ZeroKeeper(self.groups, mask)
        self.keeper.apply(opt)
        self.frozen = mask
        milestones = getattr(cfg, "milestones", None) or []
        if self.restart_at_freeze and epoch is not None and (epoch + 1) not in milestones:
            as_structured(opt, self.groups).restart()  # the final phase starts a clean stage from the committed point
        if self.final_lam is not None:  # None: survivors keep the λ they were trained with
            self._set_lam(opt, self.final_lam)
        if self.bn_data is not None:
            from compress.train.evaluate import recalibrate_batchnorm

            recalibrate_batchnorm(model, self.bn_data, next(model.parameters()).device)
        self.counts = {
            "removed_by_optimizer": int((zero & mask).sum()),
            "removed_by_enforcement": int((added & pre).sum()),
            "removed_by_alignment": int((added & ~pre).sum()),
            "revived": int(revived.sum()),
        }
        info.update(self.counts, cost_frozen=float(self.cm.cost(mask, self.kind)), groups_frozen=int(mask.sum()))
        self.freeze_info = info
        self.log(
            f"budget: froze {int(mask.sum())} zero groups at epoch {info['epoch']} — {self.counts['removed_by_optimizer']} "
            f"by the optimizer, {self.counts['removed_by_enforcement']} by enforcement, "
            f"{self.counts['removed_by_alignment']} by alignment to {info.get('alignment', {}).get('align', 1)}, "
            f"{self.counts['revived']} revived; "
            f"{self.kind} {info['cost_frozen']:.4f} (target {self.target:.4f})"
        )
        return info

    def _commit(self, opt, revived: torch.Tensor) -> None:
        """W ← Ŵ, except revived groups, which keep the iterate's values so they can train again."""
        saved = None
        if bool(revived.any()):
            saved = [
                (
                    t,
                    s.dim,
                    torch.tensor(s.indices, device=t.device),
                    t.detach().index_select(s.dim, torch.tensor(s.indices, device=t.device)).clone(),
                )
                for i in torch.nonzero(revived).flatten().tolist()
                for s, t in zip(self.groups[i].slices, self.groups[i].tensors)
            ]
        as_structured(opt, self.groups).commit_structured_point()
        for t, d, ix, vals in saved or []:
            t.detach().index_copy_(d, ix, vals)

    def _rewind(self, model) -> None:
        """The whole model back to the starting weights, in place (load_state_dict copies), so the
        groups' tensors stay bound."""
        w = self.rewind_weights() if callable(self.rewind_weights) else self.rewind_weights
        if w is None:
            raise UserError("rewind='init' needs the starting weights (rewind_weights)")
        dev = next(model.parameters()).device
        model.load_state_dict({k: v.to(dev) for k, v in w.items()})

    def state(self) -> dict:
        return {
            "target": self.target,
            "kind": self.kind,
            "freeze_epoch": self.freeze_epoch,
            "counts": self.counts,
            "frozen": None if self.frozen is None else torch.nonzero(self.frozen).flatten().tolist(),
            "freeze_info": self.freeze_info,
            "history": self.history,
        }


FINAL_OPTIMIZERS = ("adamw", "same")
REWINDS = ("none", "init")
