"""Group-sparse optimizers sharing one batched metric group prox (prox.py).

RAMDA (the method), RMDA, ProxSGD and ProxAdam (the baselines it must beat), ASGO/DASGO
(one-sided matrix preconditioner, exact prox in its eigenbasis: asgo.py, eigprox.py) and
DSGD (greedy layer-wise steps: dsgd.py), all with the constructor contract
`Opt(params, lr, lam=..., ..., groups=None)`, and dense AdamW (dense.py). registry.py holds
the one table of names, defaults and capabilities (`make_optimizer` builds any of them by
name); interface.py what the training loop and the budget controller ask of each.
ProxAdam and RAMDA take reg_space="param"|"preconditioned" (regspace.py).

Names are imported on first access, so the CLI can read the registry without loading torch.
"""

from __future__ import annotations

import importlib

_API = {
    "ASGO": "asgo",
    "DASGO": "asgo",
    "ProxOptimizer": "base",
    "AdamW": "dense",
    "CosineAdamW": "dense",
    "DSGD": "dsgd",
    "DualAveraging": "dual_averaging",
    "GroupIndex": "group_index",
    "StructuredOptimizer": "interface",
    "as_structured": "interface",
    "group_soft_threshold": "prox",
    "metric_group_prox": "prox",
    "metric_group_prox_pg": "prox",
    "PrecondProxAdam": "proxadam",
    "ProxAdam": "proxadam",
    "ProxSGD": "proxsgd",
    "PrecondRAMDA": "ramda",
    "RAMDA": "ramda",
    "RMDA": "rmda",
    "OPTIMIZERS": "registry",
    "REGISTRY": "registry",
    "OptimizerSpec": "registry",
    "build_optimizer": "registry",
    "help_text": "registry",
}
_ALIASES = {"make_optimizer": ("registry", "build_optimizer")}  # the name the API has always had

__all__ = sorted([*_API, *_ALIASES])


def __getattr__(name: str):
    module, attr = _ALIASES.get(name, (_API.get(name), name))
    if module is None:
        raise AttributeError(f"module 'compress.optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"compress.optim.{module}"), attr)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
