"""compress: train towards structure (group lasso + RAMDA), extract, export to ONNX, benchmark.

The public API is imported lazily so `import compress` stays fast and the CLI's
`--help` does not pay for onnx/onnxruntime.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "find_groups": "compress.groups",
    "load_groups": "compress.groups",
    "save_groups": "compress.groups",
    "Group": "compress.groups",
    "RAMDA": "compress.optim",
    "RMDA": "compress.optim",
    "ProxSGD": "compress.optim",
    "ProxAdam": "compress.optim",
    "finetune": "compress.train",
    "extract": "compress.extract",
    "export_onnx": "compress.export",
    "benchmark": "compress.bench",
    "count_flops": "compress.cost",
    "count_params": "compress.cost",
    "get_model": "compress.models",
    "save_compressed": "compress.saving",
    "load_compressed": "compress.saving",
    "TrainConfig": "compress.train",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
