"""compress: train towards structure (group lasso + RAMDA), extract, export to ONNX, benchmark.

The public API is imported lazily so `import compress` stays fast and the CLI's
`--help` does not pay for onnx/onnxruntime. No public name is also the name of a
submodule of this package, so every name means the same thing on every access.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # structure: what can be removed, and what it costs
    "find_groups": "compress.structure.find",
    "group_weights": "compress.structure.find",
    "Group": "compress.structure.group",
    "GroupList": "compress.structure.group",
    "load_groups": "compress.structure.group",
    "save_groups": "compress.structure.group",
    "attention_units": "compress.structure.attention",
    "group_norms": "compress.structure.sparsity",
    "group_sparsity": "compress.structure.sparsity",
    "count_flops": "compress.structure.cost",
    "count_params": "compress.structure.cost",
    "CostModel": "compress.structure.cost_model",
    # optimizers
    "RAMDA": "compress.optim",
    "RMDA": "compress.optim",
    "ProxSGD": "compress.optim",
    "ProxAdam": "compress.optim",
    "ASGO": "compress.optim",
    "DASGO": "compress.optim",
    "DSGD": "compress.optim",
    "make_optimizer": "compress.optim",
    # training
    "TrainConfig": "compress.train.config",
    "finetune": "compress.train.loop",
    "evaluate": "compress.train.evaluate",
    "recalibrate_batchnorm": "compress.train.evaluate",
    # budgets
    "Budget": "compress.budget.target",
    "finetune_to_budget": "compress.budget.runner",
    # deployment
    "extract": "compress.deploy.extract",
    "ExtractionError": "compress.deploy.extract",
    "export_onnx": "compress.deploy.export",
    "benchmark": "compress.deploy.bench",
    "export_run": "compress.deploy.pipeline",
    "bench_run": "compress.deploy.pipeline",
    "quantize_onnx": "compress.deploy.quantize",
    "quantize_run": "compress.deploy.quantrun",
    "save_compressed": "compress.deploy.saving",
    "load_compressed": "compress.deploy.saving",
    # models and errors
    "get_model": "compress.models",
    "UserError": "compress.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
