"""Budget: what the user asks for (a fraction of FLOPs or parameters, or a latency)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from compress.errors import UserError
from compress.structure.cost_model import CostModel

# --------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    """Exactly one target: `flops` or `params` as a fraction in (0, 1) of the dense model, or
    `latency_ms` measured with ONNX Runtime (CPU) at `batch` with `threads` intra-op threads
    (None: all cores) on the machine that trains."""

    flops: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    batch: int = 1
    threads: int | None = None

    def __post_init__(self):
        given = [k for k in ("flops", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError(
                f"give exactly one budget target: `flops`, `params` or `latency_ms`; got {', '.join(given) or 'none'}",
                fields=("flops", "params", "latency_ms"),
            )
        for k in ("flops", "params"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
                raise UserError(f"`{k}` must be a fraction of the dense model in (0, 1), got {v}", field=k)
        lat = self.latency_ms
        if lat is not None and not (isinstance(lat, (int, float)) and 0 < lat < math.inf):
            raise UserError(
                f"`latency_ms` must be a positive number of milliseconds, got {self.latency_ms}", field="latency_ms"
            )
        if self.latency_ms is None and (self.batch != 1 or self.threads is not None):
            raise UserError(
                "`batch` and `threads` only apply to a latency target (`latency_ms`)",
                field="batch" if self.batch != 1 else "threads",
                fields=("batch", "threads", "latency_ms"),
            )
        if not isinstance(self.batch, int) or self.batch < 1:
            raise UserError(f"`batch` must be a positive integer, got {self.batch}", field="batch")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(
                f"`threads` must be a positive integer (or unset for all cores), got {self.threads}", field="threads"
            )

    @property
    def kind(self) -> str:
        return "flops" if self.flops is not None else "params" if self.params is not None else "latency"

    @property
    def target(self) -> float:
        return float(getattr(self, "latency_ms" if self.kind == "latency" else self.kind))

    def describe(self) -> str:
        if self.kind == "latency":
            th = "all cores" if self.threads is None else f"{self.threads} thread{'s' * (self.threads > 1)}"
            return f"latency ≤ {self.target:g} ms (ONNX Runtime CPU, batch {self.batch}, {th})"
        return f"{self.kind} ≤ {self.target:g} of the dense model"

    def check_reachable(self, cm: CostModel) -> None:
        """UserError when even the smallest valid model (every group removed, one kept per layer) is above."""
        if self.kind == "latency":
            return
        floor = cm.minimum(self.kind)
        if self.target < floor:
            raise UserError(
                f"`{self.kind}` {self.target:g} is below the smallest valid model: removing every "
                f"removable group (one kept per layer) leaves {floor:.4f} of the dense {self.kind}",
                field=self.kind,
            )
