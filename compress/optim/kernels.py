"""When the optimizers' tensor kernels run through torch.compile, and one compiled copy per class.

Compiling pays off only for large tensors and where inductor has a backend; the thresholds
below were measured on the prox step (first compile costs seconds).
"""

from __future__ import annotations

import os
import types

import torch

# Below this many parameter entries compiling costs more than it saves (first compile: seconds).
COMPILE_MIN_NUMEL = 1_000_000
# Tensors smaller than this run eagerly even when compiling: a compiled call's fixed cost
# (guards, wrappers) exceeds the few eager ops such a tensor needs.
COMPILE_MIN_TENSOR = 32_768


def _clone_fn(f, tag: str):
    """A copy of `f` with its own code object: dynamo keeps one cache (and recompile budget) per code object."""
    code = f.__code__.replace(co_name=f"{f.__name__}_{tag}")
    g = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


def compile_available(device: torch.device) -> bool:
    """torch.compile is tried only where inductor has a backend (CPU with a C++ compiler, CUDA)."""
    if os.environ.get("COMPRESS_COMPILE", "") == "0" or not hasattr(torch, "compile"):
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
