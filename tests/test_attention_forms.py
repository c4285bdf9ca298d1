"""Heads of the attention forms people use: nn.MultiheadAttention's stand-in, fused qkv, GQA."""

import pytest
import torch
from layers import Conv1D
from torch import nn

from compress.structure.attention import attention_units, head_groups
from compress.structure.mha import SplitHeadAttention


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_head_attention_equals_mha_with_masks(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kpm = torch.tensor([[False] * 4 + [True], [False] * 5])
    am = torch.ones(5, 5, dtype=torch.bool).triu(1)
    ref, w_ref = mha(x, x, x, key_padding_mask=kpm, attn_mask=am)
    got, w = SplitHeadAttention(mha, [0, 1, 2, 3]).eval()(x, x, x, key_padding_mask=kpm, attn_mask=am)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


def test_mha_head_removed_matches_zeroed_head():
    """Zero head 2's in_proj rows and out_proj columns in the real MHA: the stand-in without it agrees."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    (u,) = attention_units(nn.Sequential(mha))
    g = head_groups(nn.Sequential(mha), u)[2]
    params = dict(nn.Sequential(mha).named_parameters())
    with torch.no_grad():
        for s in g.slices:
            params[s.param].index_fill_(s.dim, torch.tensor(s.indices), 0.0)
    x = torch.randn(3, 6, 16)
    ref, _ = mha(x, x, x, need_weights=False)
    got, _ = SplitHeadAttention(mha, [0, 1, 3])(x, x, x, need_weights=False)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


class _GQA(nn.Module):
    """LLaMA-style: only head_dim, 4 query heads reading 2 key/value heads (repeat_interleave)."""

    def __init__(self):
        super().__init__()
        self.head_dim = 4
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(8, 8)
        self.o_proj = nn.Linear(16, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, 4).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, 4).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, 4).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = (q @ k.transpose(-1, -2) / 2).softmax(-1) @ v
        return self.o_proj(a.transpose(1, 2).reshape(b, t, -1))


def test_gqa_group_is_a_kv_head_with_its_query_heads():
    import compress

    torch.manual_seed(2)
    m = _GQA().eval()
    x = torch.randn(2, 5, 8)
    (u,) = attention_units(m)
    assert (u.num_heads, u.kv_heads, u.q_per_group) == (4, 2, 2)
    groups = compress.find_groups(m, x)
    heads = [g for g in groups if g.kind == "head"]
    assert len(heads) == 2
    q_rows = next(s for s in heads[1].slices if s.param == "q_proj.weight").indices
    assert q_rows == tuple(range(8, 16))  # query heads 2 and 3 read kv head 1
    with torch.no_grad():
        for s, t in zip(heads[1].slices, heads[1].tensors):
            t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
    small, _ = compress.extract(m, groups, x)
    assert small.k_proj.out_features == 4 and small.q_proj.out_features == 8
    torch.testing.assert_close(small(x), m(x), atol=1e-6, rtol=1e-5)


class _RMS(nn.Module):
    """A hand-written RMSNorm between two layers: x·rsqrt(mean(x²)) reduces over the pruned width."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.g = nn.Parameter(torch.ones(16))

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g
        return self.fc2(torch.relu(h))


def test_hand_written_rmsnorm_is_refused_statically_with_the_reason():
    import compress

    m = _RMS().eval()
    groups = compress.find_groups(m, torch.randn(2, 3, 8), check=False)
    assert not [g for g in groups if g.layer == "fc1"]
    assert any(layer == "fc1" and "rsqrt(mean" in why for layer, why in groups.not_prunable)


def test_randomized_check_drops_what_the_static_analysis_misses():
    """With the static rule bypassed (check=True alone), the find-time check still drops fc1, with a reason."""
    from unittest import mock

    import compress
    from compress.structure import zero_invariance

    with mock.patch.object(zero_invariance.ZeroAnalysis, "channel_reduced", lambda *a, **k: False):
        m = _RMS().eval()
        x = torch.randn(2, 3, 8)
        assert [
            g for g in compress.find_groups(m, x, check=False) if g.layer == "fc1"
        ]  # the static rule alone misses it
        groups = compress.find_groups(m, x)
    assert not [g for g in groups if g.layer == "fc1"]
    assert any(layer == "fc1" and "randomized check" in why for layer, why in groups.not_prunable)


def _attn_flops(b, n_tok, e, h):
    """Analytic FLOPs of self-attention: q/k/v/out projections + q kᵀ and attn·v (2 per multiply-add)."""
    return 2 * b * n_tok * e * 3 * e + 2 * b * n_tok * e * e + 2 * (2 * b * h * n_tok * n_tok * (e // h))


def test_attention_flops_counted_for_mha_fast_path_sdpa_and_explicit_matmuls():
    import torch.nn.functional as F

    from compress.structure.cost import count_flops
    from compress.structure.cost_model import CostModel
    from compress.structure.find import find_groups as compress_find

    b, n_tok, e, h = 2, 5, 16, 4
    x = torch.randn(b, n_tok, e)
    mha = nn.MultiheadAttention(e, h, batch_first=True).eval()

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mha

        def forward(self, x):
            return self.m(x, x, x, need_weights=False)[0]

    class Split(nn.Module):
        def __init__(self, sdpa):
            super().__init__()
            self.num_heads, self.head_dim, self.sdpa = h, e // h, sdpa
            self.q, self.k, self.v, self.out = (nn.Linear(e, e) for _ in range(4))

        def forward(self, x):
            q, k, v = (f(x).view(b, n_tok, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v) if self.sdpa else (q @ k.transpose(-1, -2)).softmax(-1) @ v
            return self.out(a.transpose(1, 2).reshape(b, n_tok, -1))

    want = _attn_flops(b, n_tok, e, h)
    for m in (MHA(), Split(True), Split(False)):
        assert count_flops(m.eval(), (x,)) == want, type(m).__name__
    m = Split(True).eval()
    cm = CostModel(m, compress_find(m, x), x)
    assert cm.dense_flops == want
    # the attention FLOPs go with the heads: the cost model's prediction equals extraction's count
    import compress

    groups = compress_find(m, x)
    zero = torch.tensor([g.name.endswith(":head1") for g in groups])
    with torch.no_grad():
        for s, t in zip(groups[int(zero.nonzero()[0])].slices, groups[int(zero.nonzero()[0])].tensors):
            t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
    _, rep = compress.extract(m, groups, x)
    d = e // h  # one head fewer: q/k/v project to e - d, out reads e - d, attention over h - 1 heads
    after = 2 * b * n_tok * e * 3 * (e - d) + 2 * b * n_tok * (e - d) * e + 2 * (2 * b * (h - 1) * n_tok * n_tok * d)
    assert int(cm.flops(zero)) == rep["flops_after"] == after


class _GPT2Attn(nn.Module):
    """c_attn (fused q;k;v as Conv1D) split by `split_size`, heads of `head_dim`, c_proj (Conv1D)."""

    def __init__(self, e=16, h=4):
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = h, e // h, e
        self.c_attn, self.c_proj = Conv1D(3 * e, e), Conv1D(e, e)

    def forward(self, x):
        q, k, v = (
            t.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)
            for t in self.c_attn(x).split(self.split_size, dim=2)
        )
        a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, -1) @ v
        return x + self.c_proj(a.transpose(1, 2).reshape(*x.shape[:-1], -1))


def test_gpt2_conv1d_heads_found_and_removed_exactly():
    """Heads of a Conv1D fused-qkv block: rows on the weight's dim 1; the compressed model equals the
    dense one with those heads' rows zeroed (the ground truth), and split_size follows the width."""
    from compress.deploy.extract import extract
    from compress.structure.find import find_groups

    torch.manual_seed(0)
    m, x = _GPT2Attn().eval(), torch.randn(2, 5, 16)
    groups = find_groups(m, x)
    heads = [g for g in groups if g.kind == "head"]
    assert len(heads) == 4 and {s.dim for s in heads[1].slices if s.param == "c_attn.weight"} == {1}
    with torch.no_grad():
        m.c_attn.weight[:, 4:8] = 0  # head 1's q, k, v columns and biases
        m.c_attn.weight[:, 20:24] = 0
        m.c_attn.weight[:, 36:40] = 0
        m.c_attn.bias[4:8] = m.c_attn.bias[20:24] = m.c_attn.bias[36:40] = 0
        m.c_proj.weight[4:8] = 0  # and its rows of the out projection (W stored (in, out))
    small, _ = extract(m, groups, x)
    assert small.c_attn.weight.shape == (16, 36) and small.c_proj.weight.shape == (12, 16)
    assert small.split_size == 12 and small.num_heads == 3
    torch.testing.assert_close(small(x), m(x), atol=1e-5, rtol=1e-5)


class _WidthHeads(nn.Module):
    """torchvision Swin's functional form: head size = input width // num_heads, so a block with a
    head removed cannot reshape its qkv any more."""

    def __init__(self, e=16, h=4):
        super().__init__()
        self.num_heads, self.qkv, self.proj = h, nn.Linear(e, 3 * e), nn.Linear(e, e)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return x + self.proj(a.transpose(1, 2).reshape(b, n, -1))


def test_block_whose_heads_cannot_be_removed_is_refused_before_the_whole_model_check():
    from unittest import mock

    from compress.structure import soundness
    from compress.structure.find import find_groups

    m, x = nn.Sequential(_WidthHeads(), nn.Linear(16, 3)).eval(), torch.randn(2, 5, 16)
    trials = []
    real = soundness._trial
    with mock.patch.object(soundness, "_trial", lambda *a: trials.append(a) or real(*a)):
        groups = find_groups(m, x)
    assert not [g for g in groups if g.kind == "head"]
    assert any(layer == "0" and "heads not offered" in why for layer, why in groups.not_prunable)
    assert not any("randomized check" in why for _, why in groups.not_prunable) and len(trials) <= 2


def test_builtin_attention_with_every_head_zero_is_removed_whole():
    """All heads zero: the block returns its out projection's bias; nothing of q/k/v/out is left."""
    import compress
    from compress.models.transformer import EncoderBlock

    torch.manual_seed(8)
    m = EncoderBlock(16, 4, 32).eval()
    x = torch.randn(2, 5, 16)
    groups = compress.find_groups(m, x)
    with torch.no_grad():
        for g in groups:
            if g.layer == "attn":
                for s, t in zip(g.slices, g.tensors):
                    t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
        ref = m(x)
    small, rep = compress.extract(m, groups, x)
    assert rep["layers"]["attn"]["removed"] == 4 and small.attn.heads_removed == "proj:out"
    assert small.attn.q.out_features == 0 and small.attn.out.in_features == 0
    torch.testing.assert_close(small(x), ref, atol=1e-6, rtol=0)
