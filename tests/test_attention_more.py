"""Heads of the attention forms that need more than row/column removal: torchvision Swin (V1, V2).

Each test builds the unmodified library module, zeroes some heads' slices in it, and compares
its output with the extracted model (and ONNX Runtime's), so a wrong stand-in fails here.
"""

import pytest
import torch
from torch import nn

import compress
from compress.structure.cost_model import CostModel
from compress.structure.sparsity import zero_mask

pytest.importorskip("torchvision", reason="zoo extra not installed (pip install -e .[zoo])")
from zoo_models import register_torchvision_ops  # noqa: E402 - the op schemas first

register_torchvision_ops()
from torchvision.models import swin_transformer as swin  # noqa: E402


def _zero(groups, names) -> None:
    with torch.no_grad():
        for g in groups:
            if g.name in names:
                for s, t in zip(g.slices, g.tensors):
                    t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


def _check_extract(model, x, groups, zeroed, tmp_path):
    """Extracted model == the zeroed original (≤ 1e-5), ONNX Runtime agrees, FLOPs as predicted."""
    with torch.no_grad():
        ref = model(x)
    small, rep = compress.extract(model, groups, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=0)
    assert rep["groups_removed"] == len(zeroed)
    assert rep["flops_after"] == CostModel(model, groups, x).flops(zero_mask(groups)) < rep["flops_before"]
    assert rep["params_after"] == rep["params_predicted"] < rep["params_before"]
    er = compress.export_onnx(small, x, tmp_path / "m.onnx")
    assert er["max_abs_diff"] <= 1e-4
    return small


@pytest.mark.parametrize("cls", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
def test_explicit_head_size_forward_equals_torchvision_swin(cls):
    import copy

    from compress.structure.window_attention import install

    torch.manual_seed(0)
    m = getattr(swin, cls)(32, [4, 4], [2, 2], 4).eval()
    x = torch.randn(2, 10, 9, 32)  # padded to 12 x 12: masked shifted windows, padding cut off
    ours = copy.deepcopy(m)
    install(ours, "swin")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), m(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
def test_torchvision_swin_heads_removed_exactly(cls, tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), getattr(swin, cls)(32, [4, 4], [2, 2], 4)).eval()
    x = torch.randn(2, 10, 9, 32)
    groups = compress.find_groups(model, x)
    heads = [g.name for g in groups if g.kind == "head"]
    assert heads == [f"1:head{h}" for h in range(4)], groups.not_prunable
    _zero(groups, {"1:head1", "1:head3"})
    small = _check_extract(model, x, groups, ["1:head1", "1:head3"], tmp_path)
    attn = small[1]
    assert (attn.num_heads, attn.qkv.out_features, attn.proj.in_features) == (2, 48, 16)
    per_head = attn.cpb_mlp[2].weight if cls.endswith("V2") else attn.relative_position_bias_table
    assert per_head.shape[0 if cls.endswith("V2") else 1] == 2
    _reloads(small, nn.Sequential(nn.Linear(32, 32), getattr(swin, cls)(32, [4, 4], [2, 2], 4)), x, tmp_path)


def _reloads(small, fresh, x, tmp_path) -> None:
    """save_compressed + load_compressed into a fresh dense model from the same constructor."""
    from compress.deploy.saving import load_compressed, save_compressed

    save_compressed(small, tmp_path / "small.safetensors")
    back = load_compressed(fresh.eval(), tmp_path / "small.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x), atol=0, rtol=0)


def _maxvit(seed):
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32), RelativePositionalMultiHeadAttention(32, 8, 16)).eval()


def test_explicit_head_size_forward_equals_torchvision_maxvit():
    import copy

    from compress.structure.window_attention import install

    m, x = _maxvit(8)[1], torch.randn(2, 3, 16, 32)
    ours = copy.deepcopy(m)
    install(ours, "maxvit")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), m(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("zeroed", [["1:head0", "1:head2"], [f"1:head{h}" for h in range(4)]])
def test_torchvision_maxvit_heads_removed_exactly(zeroed, tmp_path):
    """Two heads, then all four (the block is removed whole: it returns merge's bias)."""
    model, x = _maxvit(9), torch.randn(2, 3, 16, 32)
    groups = compress.find_groups(model, x)
    assert [g.name for g in groups if g.kind == "head"] == [f"1:head{h}" for h in range(4)], groups.not_prunable
    _zero(groups, set(zeroed))
    small = _check_extract(model, x, groups, zeroed, tmp_path)
    attn = small[1]
    assert attn.n_heads * attn.head_dim == attn.merge.in_features == 32 - 8 * len(zeroed)
    assert attn.relative_position_bias_table.shape[1] == 4 - len(zeroed)
    _reloads(small, _maxvit(0), x, tmp_path)


def test_t5_heads_removed_per_block_with_the_shared_position_bias(tmp_path):
    """Block 0 computes the relative position bias for all heads and passes it on: every block,
    block 0 included, must add only its kept heads' rows (different ones per block here)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(2)
    cfg = tf.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, use_cache=False)
    model = tf.T5EncoderModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    groups = compress.find_groups(model, ids)
    att = "encoder.block.{}.layer.0.SelfAttention"
    assert sum(g.kind == "head" for g in groups) == 12, groups.not_prunable
    zeroed = [f"{att.format(0)}:head1", f"{att.format(0)}:head2", f"{att.format(1)}:head0", f"{att.format(2)}:head3"]
    _zero(groups, set(zeroed))
    small = _check_extract(model, ids, groups, zeroed, tmp_path)
    blocks = [small.get_submodule(att.format(i)) for i in range(3)]
    assert [b.kept_heads for b in blocks] == [[0, 3], [1, 2, 3], [0, 1, 2]]
    assert [b.n_heads for b in blocks] == [2, 3, 3]
    assert blocks[0].relative_attention_bias.weight.shape == (32, 4)  # shared: stays full-width
    from compress.deploy.saving import load_compressed, save_compressed

    save_compressed(small, tmp_path / "small.safetensors")
    back = load_compressed(tf.T5EncoderModel(cfg).eval(), tmp_path / "small.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).last_hidden_state, small(ids).last_hidden_state, atol=0, rtol=0)


# --------------------------------------------------------------------------- whole blocks


def _zero_layer(groups, layer) -> list[str]:
    names = [g.name for g in groups if g.layer == layer and g.kind == "head"]
    _zero(groups, set(names))
    return names


class _MHA(nn.Module):
    """An MHA block called with a padding mask."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        kpm = torch.zeros(x.shape[:2], dtype=torch.bool)
        kpm[0, -2:] = True
        h = self.fc(x)
        return self.attn(h, h, h, key_padding_mask=kpm)[0]


def test_mha_with_every_head_zero_is_removed_whole(tmp_path):
    torch.manual_seed(3)
    model, x = _MHA().eval(), torch.randn(2, 6, 16)
    nn.init.normal_(model.attn.out_proj.bias)
    groups = compress.find_groups(model, x)
    zeroed = _zero_layer(groups, "attn")
    assert len(zeroed) == 4
    small = _check_extract(model, x, groups, zeroed, tmp_path)
    assert small.attn.in_proj_weight.shape == (0, 16) and small.attn.out_proj.weight.shape == (16, 0)
    assert not [g for g in compress.find_groups(small, x) if g.kind == "head"]


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_without_heads_returns_the_zeroed_modules_output_and_weights(batch_first):
    """The constant forward against the real nn.MultiheadAttention with every head zeroed."""
    from compress.structure import no_heads

    torch.manual_seed(7)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_weight.zero_()
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.zero_()
        mha.out_proj.bias.normal_()  # nn.MultiheadAttention starts it at zero
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kpm = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    kw = dict(key_padding_mask=kpm, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1))
    ref = mha(x, x, x, **kw)
    no_heads._set(mha, "mha")
    got = mha(x, x, x, **kw)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=0)


def test_timm_vit_block_with_every_head_zero_is_removed_whole(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
    model, x = model.eval(), torch.randn(2, 3, 32, 32)
    groups = compress.find_groups(model, x)
    zeroed = _zero_layer(groups, "blocks.0.attn") + ["blocks.1.attn:head2"]
    _zero(groups, {"blocks.1.attn:head2"})
    small = _check_extract(model, x, groups, zeroed, tmp_path)
    assert small.blocks[0].attn.qkv.out_features == 0 and small.blocks[1].attn.num_heads == 3
    again = compress.find_groups(small, x)  # the extracted model can be compressed further
    assert sum(g.layer == "blocks.1.attn" for g in again) == 3 and not any(g.layer == "blocks.0.attn" for g in again)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # eager: the layer also returns attention probabilities
def test_bert_layer_with_every_head_zero_is_removed_whole_and_reloads(impl, tmp_path):
    tf = pytest.importorskip("transformers")
    from compress.deploy.saving import load_compressed, save_compressed

    torch.manual_seed(5)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    cfg._attn_implementation = impl
    model, ids = tf.BertModel(cfg).eval(), torch.randint(0, 50, (2, 7))
    groups = compress.find_groups(model, ids)
    zeroed = _zero_layer(groups, "encoder.layer.1.attention")
    small = _check_extract(model, ids, groups, zeroed, tmp_path)
    assert small.encoder.layer[1].attention.self.query.out_features == 0
    from compress.structure.attention import attention_units

    assert {u.name: u.num_heads for u in attention_units(small)} == {
        "encoder.layer.0.attention": 4,
        "encoder.layer.1.attention": 0,  # still listed (reports show 0 / 4), offering no head
    }
    again = compress.find_groups(small, ids)
    assert {g.layer for g in again if g.kind == "head"} == {"encoder.layer.0.attention"}, again.not_prunable
    save_compressed(small, tmp_path / "small.safetensors")
    back = load_compressed(tf.BertModel(cfg).eval(), tmp_path / "small.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).last_hidden_state, small(ids).last_hidden_state, atol=0, rtol=0)


def test_t5_block_keeps_one_head_when_all_are_zero():
    """T5's blocks return the shared position bias: no whole-block form, extraction keeps one head."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = tf.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False)
    model, ids = tf.T5EncoderModel(cfg).eval(), torch.randint(0, 50, (2, 7))
    groups = compress.find_groups(model, ids)
    _zero_layer(groups, "encoder.block.1.layer.0.SelfAttention")
    small, rep = compress.extract(model, groups, ids)
    assert small.encoder.block[1].layer[0].SelfAttention.n_heads == 1
    assert rep["flops_after"] == CostModel(model, groups, ids).flops(zero_mask(groups))


# --------------------------------------------------------------------------- timm LeViT


def _levit(kind, seed):
    from timm.models import levit

    torch.manual_seed(seed)
    if kind == "Attention":
        attn = levit.Attention(32, 8, num_heads=4, attn_ratio=2, resolution=4)
    else:
        attn = levit.AttentionDownsample(32, 48, 8, num_heads=4, attn_ratio=2, stride=2, resolution=4)
    model = nn.Sequential(nn.Linear(32, 32), attn)
    with torch.no_grad():  # away from their zero/identity initialisation, so a wrong row shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
        attn.attention_biases.normal_()
    model.eval()
    return model


@pytest.mark.parametrize("kind", ["Attention", "AttentionDownsample"])
def test_timm_levit_heads_removed_exactly(kind, tmp_path):
    pytest.importorskip("timm")
    model, x = _levit(kind, 10), torch.randn(2, 16, 32)
    with torch.no_grad():
        model(x)  # fills LeViT's eval-time bias cache, which extraction must slice too
    groups = compress.find_groups(model, x)
    assert [g.name for g in groups if g.kind == "head"] == [f"1:head{h}" for h in range(4)], groups.not_prunable
    _zero(groups, {"1:head1", "1:head3"})
    small = _check_extract(model, x, groups, ["1:head1", "1:head3"], tmp_path)
    attn = small[1]
    assert attn.num_heads == 2 and attn.val_attn_dim == 32 and attn.attention_biases.shape[0] == 2
    assert attn.proj.ln.linear.in_features == 32 and attn.proj.ln.bn.num_features == attn.proj.ln.linear.out_features


def test_block_whose_whole_removal_fails_keeps_its_heads_and_one_head_at_extraction():
    """MobileViT's `.self` returns a tensor, not (context, weights): the BERT-style whole-block form does
    not fit, the find-time check says so (`whole` stays False) and extraction keeps one head, exactly."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(11)
    cfg = tf.MobileViTConfig(
        image_size=64,
        hidden_sizes=[32, 48, 64],
        neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160],
        num_attention_heads=2,
    )
    model, x = tf.MobileViTModel(cfg).eval(), torch.randn(1, 3, 64, 64)
    groups = compress.find_groups(model, x)
    heads = [g for g in groups if g.kind == "head"]
    assert heads and not any(g.whole for g in heads)
    layer = heads[0].layer
    zeroed = _zero_layer(groups, layer)
    small, rep = compress.extract(model, groups, x)
    assert rep["layers"][layer]["removed"] == len(zeroed) - 1 and rep["layers"][layer]["kept"]
    assert rep["flops_after"] == CostModel(model, groups, x).flops(zero_mask(groups))


def test_whole_flag_survives_the_groups_file(tmp_path):
    from compress.structure.group import load_groups, save_groups

    torch.manual_seed(12)
    model, x = _MHA().eval(), torch.randn(2, 6, 16)
    groups = compress.find_groups(model, x)
    assert [g.whole for g in groups if g.kind == "head"] == [True] * 4
    save_groups(tmp_path / "g.json", groups)
    back = load_groups(tmp_path / "g.json", model)
    assert [g.whole for g in back] == [g.whole for g in groups]


@pytest.mark.parametrize(
    "name,layer,whole",
    [
        ("hf_llama", "layers.0.self_attn", True),  # grouped-query: every kv head with its query heads
        ("hf_gpt2", "h.0.attn", True),  # Conv1D projections
        ("hf_distilbert", "transformer.layer.0.attention", True),
        ("hf_albert", "encoder.albert_layer_groups.0.albert_layers.0.attention", False),  # adds the residual, LayerNorm
    ],
)
def test_hf_blocks_returning_their_projection_go_whole_others_keep_one_head(name, layer, whole, tmp_path):
    pytest.importorskip("transformers")
    from zoo_models import build

    model, ids = build(name)
    groups = compress.find_groups(model, ids)
    assert {g.whole for g in groups if g.layer == layer} == {whole}
    zeroed = _zero_layer(groups, layer)
    if whole:
        _check_extract(model, ids, groups, zeroed, tmp_path)
    else:
        small, rep = compress.extract(model, groups, ids)
        assert rep["layers"][layer]["removed"] == len(zeroed) - 1
        assert rep["flops_after"] == CostModel(model, groups, ids).flops(zero_mask(groups))
