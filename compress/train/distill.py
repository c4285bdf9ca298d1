"""Knowledge distillation from the starting model: the teacher is a frozen copy of the model at its
init weights (out/init.safetensors), so a compressed student keeps the dense model's function
rather than only its labels — the dense model's soft outputs carry what a pruned model loses first.

Losses (student output s, teacher output t, temperature T):
  kl      Hinton's KD: KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch (classification);
  cosine  1 − cos(s, t) per sample, averaged (embeddings);
  mse     mean squared error between s and t (embeddings, regression).
The training loss is `alpha · distillation + (1 − alpha) · task loss` (alpha = 1: pure distillation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

DISTILL_KINDS = ("none", "kl", "cosine", "mse")


def output_tensor(out) -> torch.Tensor:
    """The tensor a model's output is compared on: itself, `.logits`, a dict's logits/embedding, or
    a tuple's first element (Hugging Face style outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "sentence_embedding", "last_hidden_state"):
        if isinstance(out, dict) and name in out:
            return out[name]
        if hasattr(out, name) and isinstance(getattr(out, name), torch.Tensor):
            return getattr(out, name)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot distill a model output of type {type(out).__name__}")


def distill_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation term of `kind` (see the module docstring); the teacher carries no gradient."""
    s, t = student.float(), teacher.detach().float()
    if kind == "kl":
        s, t = s.flatten(0, -2), t.flatten(0, -2)  # rows = samples (× positions), columns = classes
        log_p = F.log_softmax(s / temperature, dim=-1)
        log_q = F.log_softmax(t / temperature, dim=-1)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2
    if kind == "cosine":
        return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown distillation kind {kind!r}")


def make_teacher(model: torch.nn.Module, init_weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A frozen copy of `model` holding `init_weights`: eval mode (BatchNorm running statistics, no
    dropout), no gradients, so it neither trains nor draws random numbers (resume stays bit-exact)."""
    from compress.train.checkpoint import load_into

    teacher = copy.deepcopy(model)
    device = next(model.parameters()).device
    load_into(teacher, {k: v.to(device) for k, v in init_weights.items()}, "the teacher's init weights")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillLoss:
    """loss(student_out, y, x) = alpha · distill(student, teacher(x)) + (1 − alpha) · task(student_out, y)."""

    def __init__(
        self, teacher: torch.nn.Module, task_loss: Callable, kind: str, temperature: float, alpha: float, call: Callable
    ):
        self.teacher, self.task_loss, self.kind = teacher, task_loss, kind
        self.temperature, self.alpha, self.call = temperature, alpha, call

    def __call__(self, out, y, x) -> torch.Tensor:
        with torch.no_grad():
            t = output_tensor(self.call(self.teacher, x))
        kd = distill_loss(self.kind, output_tensor(out), t, self.temperature)
        if self.alpha >= 1:
            return kd
        return self.alpha * kd + (1 - self.alpha) * self.task_loss(out, y)
