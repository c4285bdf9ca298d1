"""What every group-sparse optimizer here shares: the group index, the structured point Ŵ,
sparsity measurement, kernel dispatch (torch.compile with an automatic eager fallback)
and state that round-trips bit-exactly through `state_dict()`.

A subclass defines three tensor functions (static, compile-friendly):
  `_update(grad, state, scal)`   per-step state update before the prox (moments, V, U, ...)
  `_ad(state, scal) -> (a, d)`   the subproblem in the form min τ‖w‖ + ½Σd(w − a/d)²
  `_finish(state, w, scal)`      where the prox result goes (Ŵ buffer and/or the parameter)
where `state` is a tuple of 3-D views ([A, n, B], see prox.GroupIndex) whose first entry
is the parameter itself, and `scal` a tuple of 0-dim tensors (never Python floats, so a
compiled kernel does not recompile when the learning rate changes), plus `_step()`.

Steps run over a "step index": large tensors one by one (compiled when worth it), 1-D
tensors of a param group packed into one flat tensor whose state buffers back the
per-parameter state entries (which are views into them).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch

from compress.optim.group_index import GroupIndex
from compress.optim.interface import StructuredOptimizer, recalibrate_for
from compress.optim.kernels import (
    COMPILE_MIN_NUMEL,
    COMPILE_MIN_TENSOR,
    _clone_fn,
    compile_available,
)
from compress.optim.prox import ProxProblem, make_prox_kernels

Tensor = torch.Tensor


class ProxOptimizer(StructuredOptimizer, torch.optim.Optimizer):
    """Base of RAMDA, RMDA, ProxSGD, ProxAdam, ASGO and DSGD (see the module docstring for the hooks)."""

    # keys of per-parameter state tensors, in the order `_state_views` hands them to the kernels
    _state_keys: tuple[str, ...] = ()
    structured = True
    _has_w_hat = False  # True: the structured point Ŵ is kept apart from the iterate W
    # state buffers a frozen (removed) group must keep at zero: those that feed the entry's own update
    _frozen_keys: tuple[str, ...] = ()

    _kernel_cache: dict = {}

    def __init__(self, params, defaults: dict, groups=None, compile: bool | None = None):
        self._ready = False
        super().__init__(params, defaults)
        self._groups_spec = groups
        self._compile_flag = compile
        self._r_cache: Tensor | None = None
        self.last_stats: dict = {}
        self._build_index()
        self._ready = True

    # ------------------------------------------------------------------ index

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_ready", False):
            self._build_index()

    def _build_index(self) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} optimizes floating-point parameters only, got {p.dtype}")
        self.index = GroupIndex(params, self._groups_spec)
        pg_of = [i for i, g in enumerate(self.param_groups) for _ in g["params"]]
        self._pg_of = pg_of
        idx = self.index
        pe, pgrp = idx.pair_entry.cpu(), idx.pair_group.cpu()
        pgs = torch.tensor(pg_of, dtype=torch.long)[pe] if len(pe) else pe
        # a group's slices must share one param group (its α, λ, lr): compare any two writers
        first = torch.full((idx.n_groups,), -1, dtype=torch.long).scatter_reduce(
            0, pgrp, pgs, "amin", include_self=False
        )
        last = torch.full((idx.n_groups,), -1, dtype=torch.long).scatter_reduce(
            0, pgrp, pgs, "amax", include_self=False
        )
        if bool((first != last).any()):
            g = int(torch.nonzero(first != last)[0])
            raise ValueError(f"group {idx.names[g]} spans several param groups; put all its parameters in one")
        self._group_pg = first.clamp_min(0).to(idx.device)
        total = sum(p.numel() for p in params)
        dev = idx.device
        flag = self._compile_flag
        if flag is None:
            flag = total >= COMPILE_MIN_NUMEL and compile_available(dev)
        elif flag and not compile_available(dev):
            warnings.warn(
                "torch.compile is unavailable here (no C++ compiler or COMPRESS_COMPILE=0); running eagerly",
                stacklevel=2,
            )
            flag = False
        self._use_compile = bool(flag)
        self._eager_only: set[str] = set()
        self._r_cache = None
        # Vectors (biases, BatchNorm γ/β) are stepped packed: one flat tensor per (param group,
        # dtype), so a model with many of them costs a few ops per step, not a few per tensor.
        # (Packing matrices too would turn their row sums into per-element index_adds, which
        # cost more than the ops they save.)
        packs: dict = {}
        for k, p in enumerate(params):
            if p.dim() <= 1 and p.numel() < COMPILE_MIN_TENSOR:
                packs.setdefault((pg_of[k], p.dtype), []).append(k)
        self._packs = [ks for ks in packs.values() if len(ks) >= 2]
        self._step_index, self._layout = idx.packed(self._packs)
        self._step_pg = [pg_of[k] if kind == "param" else pg_of[self._packs[k][0]] for kind, k in self._layout]
        self._big = [e.shape3[0] * e.shape3[1] * e.shape3[2] >= COMPILE_MIN_TENSOR for e in self._step_index.entries]
        self._flat: list[dict] = [{} for _ in self._packs]
        self._state_packed = False

    # ------------------------------------------------------------------ kernels

    @classmethod
    def _kernels(cls, compiled: bool) -> dict:
        key = (cls, compiled)
        if key not in ProxOptimizer._kernel_cache:
            fns = make_prox_kernels(cls._ad, cls._finish)
            fns["update"] = cls._update
            fns = {n: _clone_fn(f, f"{cls.__name__}") for n, f in fns.items()}
            if compiled:
                fns = {n: torch.compile(f, dynamic=True, fullgraph=True) for n, f in fns.items()}
            ProxOptimizer._kernel_cache[key] = fns
        return ProxOptimizer._kernel_cache[key]

    def _call(self, name: str, k: int, *args):
        if self._use_compile and self._big[k] and name not in self._eager_only:
            try:
                return self._kernels(True)[name](*args)
            except Exception as e:  # compile failure: this kernel runs eagerly from now on (same math)
                warnings.warn(
                    f"{type(self).__name__}: torch.compile of {name!r} failed ({type(e).__name__}: "
                    f"{str(e)[:300]}); running it eagerly",
                    stacklevel=2,
                )
                self._eager_only.add(name)
        return self._kernels(False)[name](*args)

    @property
    def compiled(self) -> bool:
        """Whether steps run through torch.compile'd kernels (large tensors; failed kernels run eagerly)."""
        return self._use_compile and not {"update", "sums0", "final"} & self._eager_only

    # ------------------------------------------------------------------ hooks

    @staticmethod
    def _update(grad, state, scal):
        raise NotImplementedError

    @staticmethod
    def _ad(state, scal):
        raise NotImplementedError

    @staticmethod
    def _finish(state, w, scal):
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        """One optimizer step (gradients in p.grad); the subclass's method."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    @staticmethod
    def _check_lr_lam(lr: float, lam: float) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")

    @staticmethod
    def _buffers(p: Tensor, st: dict, zeros: Sequence[str] = (), copies: Sequence[str] = ()) -> None:
        """Contiguous per-parameter state: `zeros` start at 0, `copies` at the current point."""
        for key in zeros:
            st[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        for key in copies:
            st[key] = p.detach().clone(memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------ step helpers

    def _prepare(self):
        """Lazily create state; return (work tensors aligned with the step index, write-backs, grads)."""
        fresh = False
        for p in self.index.params:
            st = self.state[p]
            if not st:
                self._init_state(p, st)
                fresh = True
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if fresh or not self._state_packed:
            self._pack_state()

        def grad_of(p):  # a missing gradient is a zero gradient: the dual-averaging point still moves with α
            return torch.zeros_like(p) if p.grad is None else p.grad.detach()

        work, back, grads = [], [], []
        for kind, k in self._layout:
            if kind == "param":
                p = self.index.params[k]
                w = p.detach()
                if not w.is_contiguous():  # kernels use reshaped views: work on a contiguous copy
                    w = w.contiguous()
                    back.append(([p], w))
                work.append(w)
                grads.append(grad_of(p))
            else:
                ps = [self.index.params[i] for i in self._packs[k]]
                w = torch.cat([p.detach().reshape(-1) for p in ps])
                back.append((ps, w))
                work.append(w)
                grads.append(torch.cat([grad_of(p).reshape(-1) for p in ps]))
        return work, back, grads

    def _pack_state(self) -> None:
        """Move the state of packed parameters into flat buffers; state[p][key] become views of them."""
        for i, ks in enumerate(self._packs):
            ps = [self.index.params[k] for k in ks]
            for key in self._state_keys:
                flat = torch.cat([self.state[p][key].reshape(-1) for p in ps])
                off = 0
                for p in ps:
                    self.state[p][key] = flat[off : off + p.numel()].view(p.shape)
                    off += p.numel()
                self._flat[i][key] = flat
        self._state_packed = True

    def _step_views(self, key: str) -> list[Tensor]:
        """State buffer `key` as 3-D views aligned with the step index."""
        out = []
        for j, (kind, k) in enumerate(self._layout):
            t = self.state[self.index.params[k]][key] if kind == "param" else self._flat[k][key]
            out.append(self._step_index.view3(j, t))
        return out

    def _state_views(self, j: int, work: Sequence[Tensor]) -> tuple:
        kind, k = self._layout[j]
        v3 = self._step_index.view3
        if kind == "param":
            st = self.state[self.index.params[k]]
            return (v3(j, work[j]),) + tuple(v3(j, st[key]) for key in self._state_keys)
        return (v3(j, work[j]),) + tuple(v3(j, self._flat[k][key]) for key in self._state_keys)

    def _scal_tensors(self, values: Sequence[float], like: Tensor) -> tuple:
        return tuple(torch.tensor(v, dtype=like.dtype, device=like.device) for v in values)

    def _tau(self, per_pg: Sequence[float]) -> Tensor:
        """τ_g = (per-param-group factor) · w_g, e.g. α_t λ w_g."""
        f = torch.tensor(list(per_pg), dtype=torch.float64, device=self.index.device)
        return f[self._group_pg] * self.index.weights if self.index.n_groups else f[:0]

    # warm start r: float64 cache, canonical copy rounded to the parameters' dtype in state["r"]

    def _r_dtype(self) -> torch.dtype:
        dts = {self.index.params[k].dtype for k in self.index.grouped} or {torch.float64}
        return max(dts, key=lambda d: torch.finfo(d).eps)

    def _get_r(self) -> Tensor:
        if self._r_cache is None:
            idx = self.index
            r = torch.zeros(idx.n_groups + 1, dtype=torch.float64, device=idx.device)
            for k in idx.grouped:
                st = self.state[idx.params[k]]
                if "r" in st:
                    r[idx.entries[k].gid_ext] = st["r"].to(torch.float64)
            self._r_cache = r[: idx.n_groups]
        return self._r_cache

    def _set_r(self, r: Tensor) -> None:
        idx = self.index
        r = r.to(self._r_dtype()).to(torch.float64)  # what a resumed run reads back, bit for bit
        self._r_cache = r
        per = idx.expand_all(r, 0.0, [p.dtype for p in idx.params])
        for k in idx.grouped:
            self.state[idx.params[k]]["r"] = per[k]

    def _begin(self, vals: Sequence[Sequence[float]]):
        """State update of every parameter; returns the subproblem and the write-backs.

        `vals[i]`: the scalars of param group i, handed to the kernels as 0-dim tensors.
        """
        work, back, grads = self._prepare()
        idx = self._step_index
        cache: dict = {}
        scals, states = [], []
        for j, w in enumerate(work):
            key = (self._step_pg[j], w.dtype)
            if key not in cache:
                cache[key] = self._scal_tensors(vals[self._step_pg[j]], w)
            scals.append(cache[key])
            states.append(self._state_views(j, work))
        for j in range(len(work)):
            self._call("update", j, idx.view3(j, grads[j]), states[j], scals[j])
        return ProxProblem(idx, self._call, states, scals), back

    def _end(self, back, info: dict) -> None:
        for ps, w in back:  # packed and non-contiguous parameters were updated in a copy
            parts = [v.view(p.shape) for p, v in zip(ps, w.reshape(-1).split([p.numel() for p in ps]))]
            torch._foreach_copy_([p.detach() for p in ps], parts)
        self.last_stats = info

    # ------------------------------------------------------------------ structured point

    def _structured_tensors(self) -> list[Tensor]:
        out = []
        for p in self.index.params:
            st = self.state.get(p, {})
            out.append(st["w_hat"] if self._has_w_hat and "w_hat" in st else p.detach())
        return out

    @contextlib.contextmanager
    def structured_point(self):
        """Temporarily load Ŵ into the parameters (evaluation, measurement); W is restored on exit."""
        saved = []
        if self._has_w_hat:
            with torch.no_grad():
                for p, w in zip(self.index.params, self._structured_tensors()):
                    if w is not p and w.data_ptr() != p.data_ptr():
                        saved.append((p, p.detach().clone()))
                        p.detach().copy_(w)
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, w in saved:
                    p.detach().copy_(w)

    @torch.no_grad()
    def commit_structured_point(self, model: torch.nn.Module | None = None, data=None) -> None:
        """Copy Ŵ into the parameters for good (before extraction/export); given the `model` and training
        `data`, recalibrate its BatchNorm statistics for Ŵ (refused without `data`: see `recalibrate_for`)."""
        if self._has_w_hat:
            for p, w in zip(self.index.params, self._structured_tensors()):
                if w.data_ptr() != p.data_ptr():
                    p.detach().copy_(w)
        recalibrate_for(model, data)

    @torch.no_grad()
    def group_norms(self) -> Tensor:
        """‖Ŵ_g‖₂ per group (float64, in the order of `groups` / `self.index.names`)."""
        return self.index.group_sq_norms(self._structured_tensors()).sqrt()

    @torch.no_grad()
    def group_sparsity(self) -> tuple[float, float]:
        """(fraction of groups exactly zero, fraction of grouped entries inside zero groups), on Ŵ."""
        return self.index.sparsity(self._structured_tensors())

    def restart(self) -> None:
        """Start a new stage (a learning-rate decay). No-op unless the method has stages."""

    def frozen_state_keys(self) -> tuple[str, ...]:
        return self._frozen_keys

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._r_cache = None
        self._state_packed = False
