"""Group-sparse optimizers sharing one batched metric group prox (prox.py).

RAMDA (the method), RMDA, ProxSGD and ProxAdam (the baselines it must beat), ASGO/DASGO
(one-sided matrix preconditioner, exact prox in its eigenbasis: asgo.py, eigprox.py) and
DSGD (greedy layer-wise steps: dsgd.py), all with the constructor contract
`Opt(params, lr, lam=..., ..., groups=None)`, and dense AdamW (dense.py). registry.py holds
the one table of names, defaults and capabilities (`make_optimizer` builds any of them by
name); interface.py what the training loop and the budget controller ask of each.
ProxAdam and RAMDA take reg_space="param"|"preconditioned" (regspace.py).
"""
from __future__ import annotations

from compress.optim.asgo import ASGO, DASGO
from compress.optim.base import ProxOptimizer
from compress.optim.dense import AdamW, CosineAdamW
from compress.optim.dsgd import DSGD
from compress.optim.dual_averaging import DualAveraging
from compress.optim.group_index import GroupIndex
from compress.optim.interface import StructuredOptimizer, as_structured
from compress.optim.prox import (
    group_soft_threshold,
    metric_group_prox,
    metric_group_prox_pg,
)
from compress.optim.proxadam import PrecondProxAdam, ProxAdam
from compress.optim.proxsgd import ProxSGD
from compress.optim.ramda import RAMDA, PrecondRAMDA
from compress.optim.registry import (
    OPTIMIZERS,
    REGISTRY,
    OptimizerSpec,
    build_optimizer,
    help_text,
)
from compress.optim.rmda import RMDA

make_optimizer = build_optimizer  # the name the API has always had

__all__ = [
    "ASGO",
    "DASGO",
    "DSGD",
    "OPTIMIZERS",
    "RAMDA",
    "REGISTRY",
    "RMDA",
    "AdamW",
    "CosineAdamW",
    "DualAveraging",
    "GroupIndex",
    "OptimizerSpec",
    "PrecondProxAdam",
    "PrecondRAMDA",
    "ProxAdam",
    "ProxOptimizer",
    "ProxSGD",
    "StructuredOptimizer",
    "as_structured",
    "build_optimizer",
    "group_soft_threshold",
    "help_text",
    "make_optimizer",
    "metric_group_prox",
    "metric_group_prox_pg",
]
