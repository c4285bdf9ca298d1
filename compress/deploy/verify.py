"""Proof that an exported ONNX file computes what the torch model computes.

ONNX Runtime (CPU) and torch run on the same random inputs — batch 1, `verify_batch`
and, for text inputs, another sequence length — and on the caller's held-out data,
where top-1 accuracy of both is measured too. Random inputs are drawn from each example
tensor's own value range, so token ids stay inside the vocabulary and masks stay 0/1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compress.deploy.diagnose import one_line
from compress.errors import UserError
from compress.structure.tensors import flatten_tensors, positional_args


@dataclass
class VerifyPlan:
    """What the export traced and what the ONNX file must agree with."""

    model: torch.nn.Module
    inputs: tuple  # the traced example tensors (CPU)
    device: torch.device  # where the model's parameters live
    names: list  # ONNX input names, one per input
    dyn_in: list  # per input: {dim: "batch" | "seq"}
    dynamic_batch: bool
    dyn_seq: list  # per input: is dim 1 a dynamic sequence length
    eval_data: object = None
    rtol: float = 1e-4
    atol: float = 1e-4
    verify_batch: int = 7


def random_like(t: torch.Tensor, batch: int | None, seq: int | None, gen: torch.Generator) -> torch.Tensor:
    """A random tensor like `t` with dim 0 = batch and (text inputs) dim 1 = seq, drawn
    from t's own value range so ids stay inside the vocabulary and masks stay 0/1."""
    shape = list(t.shape)
    if batch is not None and shape:
        shape[0] = batch
    if seq is not None and len(shape) >= 2:
        shape[1] = seq
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not t.dtype.is_floating_point:
        lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
        out = torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype)
        if lo == 0 and hi == 1 and seq is not None and len(shape) >= 2:
            out[:, 0] = 1  # an attention mask keeps one token, as a real one does
        return out
    tf = t.detach().float().cpu()
    mean, std = (float(tf.mean()), float(tf.std())) if t.numel() > 1 else (0.0, 1.0)
    return (torch.randn(shape, generator=gen) * (std if std > 0 else 1.0) + mean).to(t.dtype)


def torch_forward(model, inputs, device):
    with torch.no_grad():
        return model(*[x.to(device) for x in inputs])


def torch_run(model, inputs, device) -> list[np.ndarray]:
    outs = flatten_tensors(torch_forward(model, inputs, device))
    return [o.detach().float().cpu().numpy() if o.dtype.is_floating_point else o.detach().cpu().numpy() for o in outs]


class OutputDiff:
    """Running max |Δ| and normwise relative Δ over every comparison, and the worst violation."""

    def __init__(self, out_names, rtol, atol):
        self.out_names, self.rtol, self.atol = out_names, rtol, atol
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst = None  # (excess, where, output, index, torch value, onnx value)

    def add(self, ref: list[np.ndarray], got: list[np.ndarray], where: str) -> float:
        if len(ref) != len(got):
            raise UserError(f"ONNX model has {len(got)} outputs, torch {len(ref)} ({where})")
        worst_here = 0.0
        for name, r, g in zip(self.out_names, ref, got):
            if r.shape != g.shape:
                raise UserError(f"ONNX output {name!r} has shape {tuple(g.shape)}, torch {tuple(r.shape)} ({where})")
            worst_here = max(worst_here, self._add_one(name, r, g, where))
        return worst_here

    def _add_one(self, name, r, g, where) -> float:
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        both_nan = np.isnan(r64) & np.isnan(g64)
        d = np.where(both_nan, 0.0, np.abs(r64 - g64))
        d = np.where(np.isnan(d), np.inf, d)
        if d.size == 0:
            return 0.0
        m = float(d.max())
        scale = float(np.nanmax(np.abs(r64))) if r64.size else 0.0
        self.max_abs = max(self.max_abs, m)
        self.max_rel = max(self.max_rel, m / scale if scale > 0 else (0.0 if m == 0 else float("inf")))
        excess = d - (self.atol + self.rtol * np.abs(np.nan_to_num(r64)))
        i = int(np.argmax(excess))
        if excess.flat[i] > 0 and (self.worst is None or excess.flat[i] > self.worst[0]):
            idx = tuple(int(v) for v in np.unravel_index(i, r.shape))
            self.worst = (float(excess.flat[i]), where, name, idx, float(r64.flat[i]), float(g64.flat[i]))
        return m

    def raise_if_bad(self):
        if self.worst is not None:
            _, where, name, idx, tv, ov = self.worst
            raise UserError(
                f"ONNX Runtime disagrees with torch: output {name!r}{list(idx)} = {ov:.8g} in ONNX vs {tv:.8g} in "
                f"torch (|Δ| = {abs(ov - tv):.3g} > atol {self.atol:g} + rtol {self.rtol:g}·|torch|) on {where}; "
                f"max |Δ| over all checks {self.max_abs:.3g}"
            )


def _session(onnx_path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


def _ort_run(sess, names, inputs) -> list[np.ndarray]:
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}
    return [np.asarray(o) for o in sess.run(None, feed)]


def _random_sizes(plan: VerifyPlan) -> list[tuple]:
    """(batch, seq) of each random check: batch 1 and `verify_batch` when the batch is dynamic,
    plus another sequence length (half, or one more when short) for text inputs."""
    inputs = plan.inputs
    b0 = inputs[0].shape[0] if inputs[0].dim() else None
    sizes = [(1, None), (plan.verify_batch, None)] if plan.dynamic_batch else [(b0, None)]
    if any(plan.dyn_seq):
        t = next(x.shape[1] for x, s in zip(inputs, plan.dyn_seq) if s)
        sizes.append((sizes[-1][0], max(2, t // 2 + 1) if t > 2 else t + 1))
    return sizes


def verify_onnx(plan: VerifyPlan, onnx_path: str, gen: torch.Generator) -> dict:
    """Compare ORT with torch on random inputs and `plan.eval_data`; raise on any violation."""
    sess = _session(onnx_path)
    diff = OutputDiff([o.name for o in sess.get_outputs()], plan.rtol, plan.atol)
    checks = []
    for b, t in _random_sizes(plan):
        rnd = [
            random_like(x, b if d.get(0) else None, t if d.get(1) else None, gen)
            for x, d in zip(plan.inputs, plan.dyn_in)
        ]
        where = f"random inputs of shape {[tuple(x.shape) for x in rnd]}"
        try:
            got = _ort_run(sess, plan.names, rnd)
        except Exception as e:
            raise UserError(f"ONNX Runtime failed on {where}: {one_line(e)}") from e
        m = diff.add(torch_run(plan.model, rnd, plan.device), got, where)
        checks.append({"inputs": [list(x.shape) for x in rnd], "max_abs_diff": m})
    res = {}
    if plan.eval_data is not None:
        res = _eval(plan, sess, diff)
        checks.append({"inputs": "eval_data", "max_abs_diff": res.pop("max_abs_diff")})
    diff.raise_if_bad()
    return {"max_abs_diff": diff.max_abs, "max_rel_diff": diff.max_rel, "checks": checks, **res}


def _eval_batches(eval_data, batch_size=256):
    if isinstance(eval_data, torch.utils.data.Dataset):
        return torch.utils.data.DataLoader(
            eval_data, batch_size=batch_size, shuffle=False, collate_fn=getattr(eval_data, "collate", None)
        )
    return eval_data


def _eval_inputs(plan: VerifyPlan, batch) -> tuple[tuple, torch.Tensor]:
    """The (inputs, labels) of one eval batch as CPU tensors, checked against the export."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UserError("eval_data must yield (inputs, labels) pairs")
    xs, y = positional_args(batch[0], "eval_data inputs"), torch.as_tensor(batch[1]).cpu()
    if len(xs) != len(plan.names):
        raise UserError(f"eval_data gives {len(xs)} inputs, the model takes {len(plan.names)}")
    xs = tuple(torch.as_tensor(x).cpu() for x in xs)
    example = plan.inputs
    if not plan.dynamic_batch and xs[0].shape[0] != example[0].shape[0]:
        raise UserError(
            f"eval batch of {xs[0].shape[0]} but the export has a fixed batch of "
            f"{example[0].shape[0]}; export with dynamic_batch=True"
        )
    return xs, y


def _top1_hits(out: torch.Tensor, y: torch.Tensor) -> int:
    return int((out.argmax(-1) == y).sum())


def _eval(plan: VerifyPlan, sess, diff: OutputDiff) -> dict:
    """Top-1 accuracy of torch and ORT on the same batches (first output, argmax of last dim), or the
    mean of the model's own `compress_score(out, y)` (e.g. an embedding's cosine to its target)."""
    score = getattr(plan.model, "compress_score", None) or _top1_hits
    n = torch_ok = onnx_ok = 0
    worst = 0.0
    for k, batch in enumerate(_eval_batches(plan.eval_data)):
        xs, y = _eval_inputs(plan, batch)
        ref = torch_run(plan.model, xs, plan.device)
        got = _ort_run(sess, plan.names, xs)
        worst = max(worst, diff.add(ref, got, f"eval_data batch {k}"))
        torch_ok += score(torch.from_numpy(ref[0]), y)
        onnx_ok += score(torch.from_numpy(got[0]), y)
        n += len(y)
    if n == 0:
        raise UserError("eval_data is empty")
    return {"torch_accuracy": torch_ok / n, "onnx_accuracy": onnx_ok / n, "eval_samples": n, "max_abs_diff": worst}
