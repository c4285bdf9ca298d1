"""Group-sparse optimizers sharing one batched metric group prox (prox.py).

RAMDA (the method), RMDA, ProxSGD and ProxAdam (the baselines it must beat), ASGO/DASGO
(one-sided matrix preconditioner, exact prox in its eigenbasis: asgo.py, eigprox.py) and
DSGD (greedy layer-wise steps: dsgd.py), all with the constructor contract
`Opt(params, lr, lam=..., ..., groups=None)`; `make_optimizer` builds any of them (or dense
AdamW) by name. ProxAdam and RAMDA take reg_space="param"|"preconditioned" (regspace.py).
"""
from __future__ import annotations

import torch

from compress.optim.asgo import ASGO, DASGO
from compress.optim.base import ProxOptimizer
from compress.optim.dsgd import DSGD
from compress.optim.prox import (
    GroupIndex,
    group_soft_threshold,
    metric_group_prox,
    metric_group_prox_pg,
)
from compress.optim.proxadam import ProxAdam
from compress.optim.proxsgd import ProxSGD
from compress.optim.ramda import RAMDA
from compress.optim.rmda import RMDA

OPTIMIZERS = ("ramda", "rmda", "proxsgd", "proxadam", "adamw")
# The other seed methods (ALGORITHMS §3-§4), same constructor contract.
MORE_OPTIMIZERS = ("asgo", "dasgo", "dsgd")


def make_optimizer(name: str, params, groups=None, lr: float = 1e-3, lam: float = 0.0, **kw) -> torch.optim.Optimizer:
    """The optimizer called `name` (ramda|rmda|proxsgd|proxadam|asgo|dasgo|dsgd|adamw) over `params` and `groups`.

    Extra keyword arguments go to the class (e.g. momentum, solver, eps_restart_factor,
    reg_space for RAMDA; reg_space for ProxAdam; precond_every for ASGO; k, layers for
    DSGD; weight_decay for AdamW). AdamW trains dense models: it takes no groups and
    needs lam == 0.
    """
    key = str(name).lower()
    classes = {"ramda": RAMDA, "rmda": RMDA, "proxsgd": ProxSGD, "proxadam": ProxAdam, "asgo": ASGO, "dasgo": DASGO,
               "dsgd": DSGD}
    if key == "adamw":
        if lam:
            raise ValueError(f"adamw trains dense models and takes no group lasso: use lam=0 (got {lam}) "
                             "or one of ramda|rmda|proxsgd|proxadam")
        return torch.optim.AdamW(params, lr=lr, **kw)
    if key not in classes:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS + MORE_OPTIMIZERS)}")
    return classes[key](params, lr=lr, lam=lam, groups=groups, **kw)


__all__ = ["RAMDA", "RMDA", "ProxSGD", "ProxAdam", "ASGO", "DASGO", "DSGD", "MORE_OPTIMIZERS", "ProxOptimizer", "GroupIndex", "metric_group_prox",
           "metric_group_prox_pg", "group_soft_threshold", "make_optimizer", "OPTIMIZERS"]
