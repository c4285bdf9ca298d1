"""DSGD: duality structure gradient descent (ALGORITHMS §3, seed 001) with the group prox.

Layer-wise greedy coordinate descent. Every step scores each layer i (a block of
parameters) by the decrease a step −(1/L_i)·G_i^# is guaranteed to give,

    score_i = ‖G_i‖²_* / (2 L_i),

and updates the `k` best layers only:  W_i ← prox_{ψ/L_i}( W_i − (1/L_i)·G_i^# ).
G^# is the dual map of G in the layer norm:
  "euclidean": G^# = G (the dual norm is the Euclidean norm);
  "spectral":  ‖(W, b)‖² = Σ‖W‖²_op + Σ‖b‖² over the layer's matrices W (conv kernels as
               out × in·k·k) and vectors b; dual norm² Σ‖G_W‖²_nuc + Σ‖g_b‖², dual map
               (‖G_W‖_nuc·U Vᵀ, g_b) with G_W = U S Vᵀ.
The prox is the Euclidean group soft-threshold with threshold λ w_g / L_i: exact for the
Euclidean norm; for the spectral norm a pragmatic choice (that prox has no closed form).

Smoothness. The paper derives L_i from the architecture; here it is estimated online:
L_i starts at 1/lr; when layer i moved by ΔW_i at the previous step, the new gradient
gives the secant L̂ = ‖ΔG_i‖_* / ‖ΔW_i‖, folded in geometrically,
log L_i ← β log L_i + (1 − β) log L̂ (β = `L_smoothing`), and clamped to
[lo/lr₀, hi/lr₀] (`L_bounds`; the default lo = 1 makes lr the largest step). Minibatch
noise inflates secants, so the estimate errs towards smaller (safer) steps. A learning-rate
schedule scales every step by lr/lr₀ (lr₀: the lr at construction).

Layers must not cut a group (its prox acts on the whole group). Default: parameters that
share a group form one layer (a conv with its BatchNorm; residual-coupled convs together),
every other parameter is a layer of its own; `model_layers` builds named layers from a
model's modules. Per-layer bookkeeping (L, pick counts) lives in param_groups[0] so that
it round-trips through `state_dict()` and the JSON checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from compress.optim.base import ProxOptimizer
from compress.optim.prox import group_soft_threshold

Tensor = torch.Tensor

NORMS = ("euclidean", "spectral")


def _union_find(n: int, pairs) -> list[int]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(a) for a in range(n)]


def model_layers(model: torch.nn.Module, groups=None) -> tuple[list[list[Tensor]], list[str]]:
    """(layers, names): the trainable parameters of each module, merged where a group spans modules."""
    blocks, names = [], []
    for mname, mod in model.named_modules():
        ps = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if ps:
            blocks.append(ps)
            names.append(mname or "<root>")
    where = {id(p): i for i, ps in enumerate(blocks) for p in ps}
    pairs = []
    for g in groups or []:
        ids = [where[id(t)] for t in getattr(g, "tensors", []) if id(t) in where]
        pairs += [(ids[0], j) for j in ids[1:]]
    root = _union_find(len(blocks), pairs)
    layers: dict[int, list] = {}
    lnames: dict[int, list] = {}
    for i, r in enumerate(root):
        layers.setdefault(r, []).extend(blocks[i])
        lnames.setdefault(r, []).append(names[i])
    keys = sorted(layers)
    return [layers[r] for r in keys], ["+".join(lnames[r]) for r in keys]


class DSGD(ProxOptimizer):
    """Greedy layer-wise (top-`k`) proximal gradient steps of size 1/L_i; same contract as RAMDA.

    `layers`: list of parameter lists (a partition of `params`), default: see the module
    docstring. `layer_picks` counts how often each layer was updated; `pick_history`
    keeps the picks of this process's steps (not checkpointed); `plot_layer_picks` draws them.
    """

    def __init__(
        self,
        params,
        lr: float,
        lam: float = 0.0,
        k: int = 1,
        norm: str = "euclidean",
        adapt_L: bool = True,
        L_smoothing: float = 0.9,
        L_bounds: tuple[float, float] = (1.0, 1e4),
        layers: Sequence[Sequence[Tensor]] | None = None,
        layer_names: Sequence[str] | None = None,
        groups=None,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0 (the first smoothness estimate is 1/lr), got {lr}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if int(k) < 1:
            raise ValueError(f"k (layers updated per step) must be >= 1, got {k}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0 <= L_smoothing < 1:
            raise ValueError(f"L_smoothing must be in [0, 1), got {L_smoothing}")
        if not 0 < L_bounds[0] <= L_bounds[1]:
            raise ValueError(f"L_bounds must satisfy 0 < lo <= hi, got {L_bounds}")
        self.k, self.norm, self.adapt_L = int(k), norm, bool(adapt_L)
        self.L_smoothing, self.L_bounds = float(L_smoothing), (float(L_bounds[0]), float(L_bounds[1]))
        self._layers_spec, self._layer_names_spec = layers, layer_names
        super().__init__(params, dict(lr=lr, lam=lam, lr0=lr, t=0), groups=groups, compile=False)
        self._ensure_layer_state()
        self.pick_history: list[list[int]] = []

    def _ensure_layer_state(self) -> None:
        """Per-layer L (start 1/lr₀), pick counts and fresh flags; reset when the layers change."""
        n = len(self.layers)
        pg0 = self.param_groups[0]
        if len(pg0.get("layer_L", ())) != n:
            pg0["layer_L"] = [1.0 / self.param_groups[self._pg_of[ks[0]]]["lr0"] for ks in self.layers]
            pg0["layer_picks"] = [0] * n
            pg0["layer_fresh"] = [0] * n

    # ------------------------------------------------------------------ layers

    def _build_index(self) -> None:
        super()._build_index()
        idx = self.index
        params = idx.params
        pos = {id(p): k for k, p in enumerate(params)}
        spec = getattr(self, "_layers_spec", None)
        if spec is None:
            pe, pgrp = idx.pair_entry.tolist(), idx.pair_group.tolist()
            first: dict[int, int] = {}
            pairs = []
            for e, g in zip(pe, pgrp):
                if g in first:
                    pairs.append((first[g], e))
                else:
                    first[g] = e
            root = _union_find(len(params), pairs)
            members: dict[int, list[int]] = {}
            for k, r in enumerate(root):
                members.setdefault(r, []).append(k)
            self.layers = [members[r] for r in sorted(members)]
        else:
            self.layers = []
            seen = set()
            for ps in spec:
                ks = []
                for p in ps:
                    if id(p) not in pos:
                        raise ValueError("a layer holds a parameter that is not among the optimizer's parameters")
                    if pos[id(p)] in seen:
                        raise ValueError("a parameter appears in two layers")
                    seen.add(pos[id(p)])
                    ks.append(pos[id(p)])
                self.layers.append(ks)
            missing = [k for k in range(len(params)) if k not in seen]
            self.layers += [[k] for k in missing]  # parameters outside every given layer: one layer each
        n = len(self.layers)
        layer_of = torch.empty(len(params), dtype=torch.long)
        for i, ks in enumerate(self.layers):
            layer_of[ks] = i
            if len({self._pg_of[k] for k in ks}) > 1:
                raise ValueError(f"layer {i} spans several param groups; put all its parameters in one")
        self._layer_of_param = layer_of
        # every group must live inside one layer: compare the layers of any two of its slices
        gl = layer_of[idx.pair_entry.cpu()]
        G = idx.n_groups
        lo = torch.full((G,), n, dtype=torch.long).scatter_reduce(
            0, idx.pair_group.cpu(), gl, "amin", include_self=False
        )
        hi = torch.full((G,), -1, dtype=torch.long).scatter_reduce(
            0, idx.pair_group.cpu(), gl, "amax", include_self=False
        )
        if bool((lo != hi).any()):
            g = int(torch.nonzero(lo != hi)[0])
            raise ValueError(f"group {idx.names[g]} spans several layers; a layer must hold whole groups")
        self._group_layer = lo.clamp_max(max(n - 1, 0)).to(idx.device)
        names = getattr(self, "_layer_names_spec", None)
        if names is not None and len(names) != len(self.layers):
            raise ValueError(f"{len(names)} layer names for {len(self.layers)} layers")
        self.layer_names = list(names) if names is not None else self._default_names()

    def _default_names(self) -> list[str]:
        known = {}
        for g in self._groups_spec or []:
            for s, t in zip(getattr(g, "slices", []), getattr(g, "tensors", []) or []):
                known[id(t)] = s.param.rsplit(".", 1)[0]
        out = []
        for ks in self.layers:
            mods = []
            for k in ks:
                nm = known.get(id(self.index.params[k]), f"param{k}")
                if nm not in mods:
                    mods.append(nm)
            out.append("+".join(mods))
        return out

    @property
    def layer_picks(self) -> dict[str, int]:
        """How many steps updated each layer (name → count)."""
        return dict(zip(self.layer_names, self.param_groups[0]["layer_picks"]))

    @property
    def layer_L(self) -> list[float]:
        return list(self.param_groups[0]["layer_L"])

    # ------------------------------------------------------------------ norms

    def _dual(self, g: Tensor) -> tuple[float, Tensor | None]:
        """(‖g‖²_*, dual map or None for "g itself") of one parameter's part of the layer norm."""
        if self.norm == "spectral" and g.dim() >= 2:
            g2 = g.reshape(g.shape[0], -1)
            u, s, vh = torch.linalg.svd(g2, full_matrices=False)
            # the polar factor on the range only: directions of (numerically) zero singular
            # values are arbitrary (a cross-entropy head's gradient has rank ≤ classes − 1)
            keep = (s > s.amax() * max(g2.shape) * torch.finfo(g.dtype).eps).to(g.dtype)
            nuc = s.sum()
            return float(nuc) ** 2, (nuc * ((u * keep) @ vh)).reshape(g.shape)
        return float((g * g).sum()), None

    def _primal_sq(self, w: Tensor) -> float:
        if self.norm == "spectral" and w.dim() >= 2:
            return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)) ** 2
        return float((w * w).sum())

    def _dual_sq(self, g: Tensor) -> float:
        if self.norm == "spectral" and g.dim() >= 2:
            return float(torch.linalg.matrix_norm(g.reshape(g.shape[0], -1), ord="nuc")) ** 2
        return float((g * g).sum())

    # ------------------------------------------------------------------ step

    def _step(self) -> None:
        idx = self.index
        params = idx.params
        self._ensure_layer_state()
        pg0 = self.param_groups[0]
        for g in self.param_groups:
            g["t"] += 1
        grads = []
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("DSGD does not support sparse gradients")
            grads.append(torch.zeros_like(p) if p.grad is None else p.grad.detach())
        L = list(pg0["layer_L"])
        fresh = pg0["layer_fresh"]
        lo, hi = self.L_bounds
        if self.adapt_L:
            for i, ks in enumerate(self.layers):
                if not fresh[i]:
                    continue
                dw = sum(self._primal_sq(self.state[params[k]]["delta"]) for k in ks)
                if dw > 0:
                    dg = sum(self._dual_sq(grads[k] - self.state[params[k]]["prev_grad"]) for k in ks)
                    lr0 = self.param_groups[self._pg_of[ks[0]]]["lr0"]
                    est = max(math.sqrt(dg / dw), lo / lr0)
                    b = self.L_smoothing
                    L[i] = min(max(math.exp(b * math.log(L[i]) + (1 - b) * math.log(est)), lo / lr0), hi / lr0)
        duals = [self._dual(g) for g in grads]
        scores = torch.tensor(
            [sum(duals[k][0] for k in ks) / (2 * L[i]) for i, ks in enumerate(self.layers)], dtype=torch.float64
        )
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        picked = sorted(order[: min(self.k, len(self.layers))])
        step_size = [0.0] * len(self.layers)
        zs = [p.detach() for p in params]
        for i in picked:
            pg = self.param_groups[self._pg_of[self.layers[i][0]]]
            step_size[i] = (pg["lr"] / pg["lr0"]) / L[i]
            for k in self.layers[i]:
                gd = duals[k][1] if duals[k][1] is not None else grads[k]
                zs[k] = params[k].detach() - step_size[i] * gd
        if idx.n_groups:
            s = torch.tensor(step_size, dtype=torch.float64, device=idx.device)
            lam = torch.tensor([g["lam"] for g in self.param_groups], dtype=torch.float64, device=idx.device)
            tau = lam[self._group_pg] * idx.weights * s[self._group_layer]
            out = group_soft_threshold(zs, idx, tau)
        else:
            out = zs
        new_fresh = [0] * len(self.layers)
        picks = list(pg0["layer_picks"])
        for i in picked:
            for k in self.layers[i]:
                p = params[k]
                if self.adapt_L:
                    st = self.state[p]
                    st["delta"] = out[k] - p.detach()
                    st["prev_grad"] = grads[k].clone()
                p.detach().copy_(out[k])
            new_fresh[i] = 1
            picks[i] += 1
        pg0["layer_L"], pg0["layer_fresh"], pg0["layer_picks"] = L, new_fresh, picks
        self.pick_history.append(picked)
        self.last_stats = {"picked": [self.layer_names[i] for i in picked]}


def plot_layer_picks(opt: DSGD, path) -> None:
    """A PNG of how often DSGD updated each layer (bars) and, when known, when (dots over steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = opt.layer_names
    counts = opt.param_groups[0]["layer_picks"]
    hist = opt.pick_history
    fig, axes = plt.subplots(1, 2 if hist else 1, figsize=(11 if hist else 6, 0.4 * len(names) + 2), squeeze=False)
    ax = axes[0][0]
    ax.barh(range(len(names)), counts)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("steps that updated the layer")
    if hist:
        ax2 = axes[0][1]
        xs = [t for t, ps in enumerate(hist) for _ in ps]
        ys = [i for ps in hist for i in ps]
        ax2.scatter(xs, ys, s=2)
        ax2.set_yticks(range(len(names)), [""] * len(names))
        ax2.set_ylim(len(names) - 0.5, -0.5)
        ax2.set_xlabel("step (this process)")
    fig.suptitle("DSGD layer picks")
    fig.tight_layout()
    from compress.files import atomic_write_with

    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
