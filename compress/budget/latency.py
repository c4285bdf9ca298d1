"""The latency model: measured ONNX Runtime latency of zero patterns, fitted on blocked FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from compress.budget.controller import BudgetController
from compress.budget.patterns import ZeroKeeper, enforce
from compress.errors import UserError
from compress.structure.cost_model import CostModel
from compress.structure.tensors import as_args

# --------------------------------------------------------------------------- latency


class LatencyModel:
    """Latency of a zero pattern, predicted from measurements on this machine.

    Each measurement zeroes the pattern on a copy of the model, extracts it, exports ONNX and
    times it with ONNX Runtime interleaved with the dense model (`compress.benchmark`), so a
    point is a *ratio* to the dense latency measured in the same breath and machine drift
    cancels. `calibrate` measures magnitude-pruned patterns (weakest groups per unit of FLOPs
    first, like the regularizer) at a few FLOP fractions plus the smallest valid model, and
    fits latency/dense ≈ a + b·FLOP fraction by least squares; `flops_for(T)` inverts it.
    """

    def __init__(
        self,
        model: nn.Module,
        groups,
        example_inputs,
        cost_model: CostModel,
        *,
        batch: int = 1,
        threads: int | None = None,
        workdir=None,
        time_budget_s: float = 1.5,
        log=None,
    ):
        import tempfile

        self.model = copy.deepcopy(model).cpu().eval()
        self.groups = groups
        self.example = example_inputs
        self.cm = cost_model
        self.batch, self.threads, self.time_budget_s = batch, threads, time_budget_s
        self._tmp = tempfile.TemporaryDirectory(prefix="compress-latency-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.points: list[dict] = []
        self.fit: tuple[float, float] | None = None
        self.fit_calibration: tuple[float, float] | None = None
        self.log = log or (lambda msg: None)
        self._dense_onnx = None

    def _export(self, model, name: str) -> Path:
        from compress.deploy.export import export_onnx

        path = self.workdir / f"{name}.onnx"
        args, kwargs = as_args(self.example)
        if kwargs:
            raise UserError("a latency target needs a model with positional tensor inputs (ONNX export)")
        export_onnx(model, args if len(args) > 1 else args[0], path, verify=False)
        return path

    def _small(self, mask):
        from compress.deploy.extract import extract
        from compress.structure.group import GroupList, bind_groups

        work = copy.deepcopy(self.model)
        gl = bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in self.groups]), work)
        ZeroKeeper(gl, mask).apply()
        small, _ = extract(work, gl, self.example)
        return small

    def measure(self, mask, model: nn.Module | None = None, tag: str = "point") -> dict:
        """Extract (or take `model`, already small), export, benchmark against the dense model."""
        from compress.deploy.bench import benchmark

        if self._dense_onnx is None:
            self._dense_onnx = self._export(self.model, "dense")
        small = model if model is not None else self._small(mask)
        path = self._export(small, f"candidate{len(self.points)}")
        res = benchmark(
            self._dense_onnx, path, batch_sizes=(self.batch,), threads=(self.threads,), time_budget_s=self.time_budget_s
        )
        row = res["results"][0]
        mask = torch.as_tensor(mask, dtype=torch.bool)
        pt = {
            "tag": tag,
            "flops": float(self.cm.cost(mask, "flops")),
            "params": float(self.cm.cost(mask, "params")),
            "flops_blocked": float(self.cm.cost(mask, "flops_blocked")),
            "latency_ms": row["compressed"]["median_ms"],
            "dense_ms": row["dense"]["median_ms"],
            "ratio": row["compressed"]["median_ms"] / row["dense"]["median_ms"],
            "spread": row["compressed"]["spread"],
            "threads": row["threads"],
            "batch": row["batch"],
        }
        self.points.append(pt)
        self.log(f"latency: {tag}: FLOPs {pt['flops']:.3f} → {pt['latency_ms']:.3f} ms (dense {pt['dense_ms']:.3f} ms)")
        return pt

    @property
    def dense_ms(self) -> float:
        return float(torch.tensor([p["dense_ms"] for p in self.points]).median())

    def _fit(self, points) -> tuple[float, float]:
        f = torch.tensor([1.0] + [p["flops_blocked"] for p in points], dtype=torch.float64)
        r = torch.tensor([1.0] + [p["ratio"] for p in points], dtype=torch.float64)
        A = torch.stack([torch.ones_like(f), f], 1)
        sol = torch.linalg.lstsq(A, r[:, None]).solution.flatten()
        return float(sol[0]), float(sol[1])

    def _refit(self) -> None:
        """Least squares over every measured point except the smallest model (far from any budget)."""
        self.fit = self._fit([p for p in self.points if p["tag"] != "smallest valid model"])

    def calibrate(self, fractions=(0.75, 0.5, 0.3), target_ms: float | None = None) -> None:
        """Measure the smallest valid model (UserError right away if `target_ms` is below it), then
        magnitude patterns at `fractions` of the blocked FLOPs, and fit."""
        from compress.structure.sparsity import group_norms

        norms = group_norms(self.groups).cpu()
        none = torch.zeros(self.cm.n_groups, dtype=torch.bool)
        floor = torch.ones(self.cm.n_groups, dtype=torch.bool)
        self.min_point = self.measure(floor, tag="smallest valid model")
        if target_ms is not None:
            self.check_target(target_ms)
        for f in fractions:
            if f > self.min_point["flops_blocked"]:
                mask, _ = enforce(self.cm, none, norms, "flops_blocked", f)
                self.measure(mask, tag=f"magnitude {f:g}")
        self._refit()
        self.fit_calibration = self.fit

    def predict(self, mask, fit=None) -> float:
        a, b = fit or self.fit
        return self.dense_ms * (a + b * float(self.cm.cost(torch.as_tensor(mask, dtype=torch.bool), "flops_blocked")))

    def flops_for(self, target_ms: float) -> float:
        """The blocked-FLOP fraction whose predicted latency is `target_ms`; UserError if out of reach."""
        self.check_target(target_ms)
        a, b = self.fit
        f = (target_ms / self.dense_ms - a) / b if b > 0 else self.min_point["flops_blocked"]
        return float(min(max(f, self.min_point["flops_blocked"]), 0.99))

    def check_target(self, target_ms: float) -> None:
        lo = self.min_point["latency_ms"]
        if target_ms < lo:
            raise UserError(
                f"`latency_ms` {target_ms:g} is below what the smallest valid model reaches: "
                f"{lo:.3f} ms measured (batch {self.batch}, every removable group removed)",
                field="latency_ms",
            )
        if target_ms >= self.dense_ms:
            raise UserError(
                f"`latency_ms` {target_ms:g} is not below the dense model's {self.dense_ms:.3f} ms "
                f"(batch {self.batch}): nothing to compress",
                field="latency_ms",
            )

    def latency_of(self, pt: dict) -> float:
        """A point's latency on the session's scale: its ratio to the dense model timed in the same
        interleaved run × the dense model's median over all runs (load drift cancels)."""
        return pt["ratio"] * self.dense_ms

    def settle(self, mask, norms, ctl: BudgetController, max_probes: int = 7):
        """At the freeze, by measurement: if the frozen pattern is slower than the target, remove
        the weakest groups (per unit of blocked FLOPs) in the fewest number that measures ≤ target,
        found by bisection over the ranking (each probe: extract, export, benchmark). Returns (mask, info)."""
        target_ms = ctl.budget.latency_ms
        probes = []

        def probe(m, tag):
            pred = self.predict(m)
            pt = self.measure(m, tag=tag)
            probes.append(
                {
                    "groups": int(m.sum()),
                    "flops_blocked": pt["flops_blocked"],
                    "predicted_ms": pred,
                    "measured_ms": self.latency_of(pt),
                    "raw_ms": pt["latency_ms"],
                }
            )
            return self.latency_of(pt) <= target_ms

        if probe(mask, "frozen pattern"):
            return mask, {"probes": probes}
        zero = mask.clone()
        sav = self.cm.savings(zero, "flops_blocked")
        score = norms.double() / sav.clamp_min(1e-300)
        score[zero | (sav <= 0)] = math.inf
        order = torch.argsort(score, stable=True)[: int((~zero).sum())]

        def prefix(k):
            m = zero.clone()
            m[order[:k]] = True
            return m

        # a first guess from the fitted model, pushed down until it measures ≤ target
        self._refit()
        a, b = self.fit
        guess = (target_ms / self.dense_ms - a) / max(b, 1e-6)
        lo, hi = 0, None
        kl, kh = 0, len(order)  # the fewest removals the model says reach the guess (cost falls with k)
        while kl < kh:
            mid = (kl + kh) // 2
            if self.cm.cost(prefix(mid), "flops_blocked") <= guess:
                kh = mid
            else:
                kl = mid + 1
        k = min(max(kl, 1), len(order))
        while len(probes) < max_probes:
            if probe(prefix(k), f"freeze probe, {k} more groups"):
                hi = k
                break
            lo = k
            if k == len(order):
                raise UserError(
                    f"`latency_ms` {target_ms:g} is not reached even with every group removed", field="latency_ms"
                )
            k = min(len(order), 2 * k)
        if hi is None:
            hi = len(order)  # probes exhausted: the smallest model, measured at calibration to be fast enough
        while hi - lo > max(1, len(order) // 64) and len(probes) < max_probes:
            mid = (lo + hi) // 2
            if probe(prefix(mid), f"freeze probe, {mid} more groups"):
                hi = mid
            else:
                lo = mid
        self._refit()
        ctl.target = float(self.cm.cost(prefix(hi), "flops_blocked"))
        return prefix(hi), {"probes": probes}

    def table(self) -> dict:
        return {
            "batch": self.batch,
            "threads": self.threads,
            "block": self.cm.block,
            "fit": {"a": self.fit[0], "b": self.fit[1]} if self.fit else None,
            "fit_calibration": {"a": self.fit_calibration[0], "b": self.fit_calibration[1]}
            if self.fit_calibration
            else None,
            "dense_ms": self.dense_ms if self.points else None,
            "points": self.points,
            "model": "latency/dense ≈ a + b·(blocked FLOP fraction), least squares over the measured points",
        }
