"""Static zero-invariance analysis: does a zero channel stay zero through an op of the autograd graph?"""

from __future__ import annotations

# --------------------------------------------------------------------------- DepGraph channels

# Autograd ops that map an all-zero channel to an all-zero channel (f(0) = 0, per channel).
ZERO_PRESERVING = {
    "Relu",
    "Gelu",
    "Silu",
    "Tanh",
    "LeakyRelu",
    "Elu",
    "Hardswish",
    "Mish",
    "Neg",
    "Mul",
    "View",
    "Reshape",
    "ReshapeAlias",
    "UnsafeView",
    "Clone",
    "Cat",
    "Split",
    "SplitWithSizes",
    "Slice",
    "Unbind",
    "Expand",
    "Squeeze",
    "Unsqueeze",
    "Alias",
    "MaxPool1DWithIndices",
    "MaxPool2DWithIndices",
    "MaxPool3DWithIndices",
    "AvgPool1D",
    "AvgPool2D",
    "AvgPool3D",
    "AdaptiveAvgPool1D",
    "AdaptiveAvgPool2D",
    "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D",
    "AdaptiveMaxPool2D",
    "AdaptiveMaxPool3D",
    "NativeDropout",
    "UpsampleNearest1D",
    "UpsampleNearest2D",
    "UpsampleBilinear2D",
    "Contiguous",
}


# Autograd's names for batch_norm; the op appears on its own when a module calls F.batch_norm
# inside a larger forward (timm's BatchNormAct2d), so torch-pruning does not see a BatchNorm there.
BATCH_NORM_OPS = {"NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "NativeBatchNormLegit"}


def op_name(grad_fn) -> str:
    n = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else "?"
    return n.rstrip("0123456789").removesuffix("Backward")


def reduction_ok(gf) -> str | None:
    """None if a mean/sum reduces only spatial dims of (N, C, H, W[, D]) features."""
    op = op_name(gf)
    dims, sizes = getattr(gf, "_saved_dim", None), getattr(gf, "_saved_self_sym_sizes", None)
    if dims is None or sizes is None:
        return f"{op.lower()} over all dimensions (mixes channels)"
    nd = len(sizes)
    dims = {d % nd for d in dims}
    if nd >= 4 and dims <= set(range(2, nd)):
        return None
    return f"{op.lower()} over dims {sorted(dims)} of a {nd}-d tensor may mix channels"


class ZeroAnalysis:
    """Which nodes of one DepGraph pruning group carry an exactly-zero channel.

    Producers (conv/linear rows, embeddings, unwrapped parameters) are zero by
    construction (their slices are zeroed); zero-ness then propagates forward:
    BatchNorm with γ = β = 0 (eval: γ(x−μ)/σ + β = 0; training likewise), depthwise conv
    with zero filter and bias, PReLU, reshapes/slices/concats and unary ops with
    f(0) = 0 keep a zero input zero; an add needs every addend zero, a product any factor
    zero (so a gate such as squeeze-and-excitation's sigmoid branch may be non-zero),
    a division a zero numerator. Anything else (sigmoid, softplus, LayerNorm, an operand
    from outside the group) is non-zero, and the reason is kept for the report.
    """

    def __init__(self, DG, nodes_in, producers, name_of):
        from torch_pruning import ops

        self.T = ops.OPTYPE
        self.nodes_in, self.producers, self.name_of = nodes_in, producers, name_of
        self.by_fn = {n.grad_fn: n for n in nodes_in if n.grad_fn is not None}
        self.pads = getattr(DG, "compress_pads", {})
        self.memo: dict = {}

    def operand(self, fn):
        return self.by_fn.get(fn) if fn is not None else None

    def zero(self, node) -> tuple[bool, str | None]:
        if node in self.memo:
            return self.memo[node]
        self.memo[node] = (False, "cycle")  # autograd graphs are acyclic; guard anyway
        self.memo[node] = r = self._zero(node)
        return r

    def _all(self, nodes, what) -> tuple[bool, str | None]:
        if not nodes:
            return False, f"{what} has no input from the zeroed channel"
        for n in nodes:
            z, why = self.zero(n)
            if not z:
                return False, why
        return True, None

    def channel_reduced(self, node, seen=None) -> bool:
        """Does `node` depend, within the group, on a mean/sum over the pruned dimension?"""
        seen = set() if seen is None else seen
        if node is None or node in seen or node in self.producers or node not in self.nodes_in:
            return False
        seen.add(node)
        gf = node.grad_fn
        if node.type == self.T.ELEMENTWISE and op_name(gf) in ("Mean", "Sum") and reduction_ok(gf):
            return True
        return any(self.channel_reduced(i, seen) for i in self.data_inputs(node))

    def data_inputs(self, node):
        """In-group inputs carrying activations (not a layer's own weight transposes)."""
        return [i for i in node.inputs if i in self.nodes_in and (i in self.producers or i.inputs)]

    def _zero(self, node) -> tuple[bool, str | None]:
        T = self.T
        if node in self.producers:
            return True, None
        if node not in self.nodes_in:
            return False, f"{self.name_of(node)} is outside the group"
        t, nm = node.type, self.name_of(node)
        ins = self.data_inputs(node)
        if t == T.BN:
            if not node.module.affine:
                return False, f"BatchNorm {nm} has no affine γ/β, so BN(0) = −μ/σ ≠ 0"
            op = op_name(node.grad_fn)  # a fused BN+activation module (timm BatchNormAct2d) ends in its act
            if op not in BATCH_NORM_OPS and op not in ZERO_PRESERVING:
                return False, f"{nm} applies {op} after its BatchNorm, which may not keep zeros"
            return self._all(ins, nm)
        if t in (T.DEPTHWISE_CONV, T.PRELU, T.RESHAPE, T.SLICE, T.SPLIT, T.UNBIND, T.EXPAND, T.CONCAT):
            return self._all(ins, nm)
        if t in (T.LN, T.GN, T.IN):
            return False, f"normalised over the pruned dimension by {type(node.module).__name__} {nm}"
        if t == T.MHA:
            return False, f"passes through nn.MultiheadAttention {nm} (its heads/embedding are not prunable)"
        if t in (T.CONV, T.LINEAR):
            return False, f"{nm} mixes channels"
        if t != T.ELEMENTWISE:
            return False, f"passes through {type(node.module).__name__} {nm}, which is not known to keep zeros"
        gf = node.grad_fn
        op = op_name(gf)
        nexts = [f for f, _ in gf.next_functions] if gf is not None else []
        if op in ("Add", "Sub"):
            if len(nexts) < 2 or any(self.operand(f) is None for f in nexts):
                return (
                    False,
                    f"{op.lower()} with an operand outside the group (e.g. a constant or an unregistered parameter)",
                )
            return self._all([self.operand(f) for f in nexts], op)
        if op == "Mul":
            why = "mul with no zero factor"
            if any(self.channel_reduced(self.operand(f)) for f in nexts):
                return False, (
                    "normalised over the pruned dimension by x·rsqrt(mean(x²)) or the like (RMSNorm, "
                    "T5LayerNorm): removing a channel changes the mean"
                )
            for f in nexts:
                n = self.operand(f)
                if n is not None:
                    z, w = self.zero(n)
                    if z:
                        return True, None
                    why = w or why
            return False, why
        if op == "Div":
            n = self.operand(nexts[0]) if nexts else None
            return self.zero(n) if n is not None else (False, "division of a value outside the group")
        if op in ("Addmm", "Mm"):  # inside a consumer nn.Linear applied to a >2-d input
            n = self.operand(nexts[1] if op == "Addmm" else nexts[0]) if nexts else None
            return self.zero(n) if n is not None else (False, f"{op} operand outside the group")
        if op == "Hardtanh":
            lo, hi = getattr(gf, "_saved_min_val", None), getattr(gf, "_saved_max_val", None)
            if lo is None or not lo <= 0 <= hi:
                return False, "hardtanh whose range excludes 0"
            return self._all(ins, op)
        if op == "Threshold":
            if getattr(gf, "_saved_threshold", -1) < 0:
                return False, "threshold op with f(0) != 0"
            return self._all(ins, op)
        if op == "Select":
            dim, sizes = getattr(gf, "_saved_dim", None), getattr(gf, "_saved_self_sym_sizes", None)
            if dim is None or sizes is None:
                return False, "select on an unknown dimension"
            nd, dim = len(sizes), dim % len(sizes)
            if dim == 0 or (nd == 3 and dim == 1) or (nd >= 4 and dim >= 2):  # batch, token or spatial
                return self._all(ins, op)
            return False, f"select on dim {dim} of a {nd}-d tensor may pick out channels"
        if op in ("Mean", "Sum"):
            why = reduction_ok(gf)
            return (False, why) if why else self._all(ins, op)
        if op in BATCH_NORM_OPS:
            return self._batch_norm(gf, ins)
        if op == "ConstantPadNd":
            why = self._pad_reason(gf)
            return (False, why) if why else self._all(ins, op)
        if op in ZERO_PRESERVING:
            return self._all(ins, op)
        return False, f"op {op} may not map a zero channel to zero (f(0) != 0 or mixes channels)"

    def _batch_norm(self, gf, ins) -> tuple[bool, str | None]:
        """A functional batch_norm keeps zero at zero when its γ (and β) belong to a BatchNorm of
        this group, whose channel slices are then zeroed with it: γ·x̂ + β = 0."""
        w = getattr(gf, "_saved_weight", None)
        if w is None:
            return False, "batch_norm without affine γ/β, so BN(0) = −μ/σ ≠ 0"
        if not any(n.type == self.T.BN and getattr(n.module, "weight", None) is w for n in self.nodes_in):
            return False, "batch_norm whose γ/β are not part of the group (BN(0) = β − γμ/σ)"
        return self._all(ins, "batch_norm")

    def _pad_reason(self, gf) -> str | None:
        """None when a constant pad keeps a zero channel zero: fill value 0 and not along the
        channel dimension (dim 1, or the last of a 3-d token tensor)."""
        rec = self.pads.get(gf)
        if rec is None:
            return "constant pad whose fill value was not recorded"
        nd, pad, _, value = rec
        if value != 0.0:
            return f"constant pad with fill value {value:g} ≠ 0"
        padded = {nd - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
        if 1 in padded or (nd == 3 and 2 in padded) or nd < 3:
            return f"pad along dims {sorted(padded)} of a {nd}-d tensor may shift channels"
        return None
