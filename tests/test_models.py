"""Built-in models: group counts by hand, 50% random removal exact, counts predicted, ONNX agrees."""

import random

import pytest
import torch
from torch import nn

from compress.deploy.extract import extract
from compress.models import get_model, model_names
from compress.structure.find import find_groups

# Hand-derived group counts (see each model's docstring for the architecture):
#   resnet20/56: per stage one coupled residual group (16/32/64) + every block's conv1 (n per stage)
#   resnet50: stem 64 + stage outputs 256+512+1024+2048 + 2 x width per bottleneck
#   mobilenetv2: stem 32 (coupled with block 1's depthwise) + expand widths of the t=6 blocks
#                + one coupled projection group per stage (16+24+32+64+96+160+320) + last 1280
#   vit-tiny: 12 blocks x (3 heads + 768 MLP neurons); bert-mini: 4 x (4 heads + 1024) + 256 pooler
#   digits-vit: 3 blocks x (4 heads + 128 MLP neurons)
_MBV2_EXPAND = 96 + 144 + 144 + 192 * 2 + 192 + 384 * 3 + 384 + 576 * 2 + 576 + 960 * 2 + 960
EXPECTED = {
    "digits-resnet": {"channel": 96},
    "resnet20": {"channel": 16 + 32 + 64 + 3 * (16 + 32 + 64)},
    "resnet56": {"channel": 16 + 32 + 64 + 9 * (16 + 32 + 64)},
    "resnet50": {"channel": 64 + 256 + 512 + 1024 + 2048 + 2 * (3 * 64 + 4 * 128 + 6 * 256 + 3 * 512)},
    "mobilenetv2": {"channel": 32 + _MBV2_EXPAND + (16 + 24 + 32 + 64 + 96 + 160 + 320) + 1280},
    "vit-tiny": {"head": 36, "neuron": 12 * 768},
    "bert-mini": {"head": 16, "neuron": 4 * 1024 + 256},
    "digits-vit": {"head": 12, "neuron": 3 * 128},
}
SLOW = {"resnet50"}


def _params(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


def test_every_registered_model_has_an_expectation():
    assert set(model_names()) == set(EXPECTED)


def _randomize(model, seed):
    """Non-trivial 1-d parameters and BN statistics, so a forgotten β or bias would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + (0.8 if n.endswith("weight") else -0.2))


def _zero(group):
    with torch.no_grad():
        for s, t in zip(group.slices, group.tensors):
            t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


# Fast variants: the same architectures (same widths, same groups) on smaller inputs;
# the registered 224x224 / 128-token configurations run in the slow tests.
_FAST_INPUT = {"mobilenetv2": (3, 64, 64), "resnet50": (3, 64, 64), "vit-tiny": (3, 64, 64)}


def _inputs(name, spec, batch, seed, full=False):
    torch.manual_seed(seed)
    if full:
        return spec.example_input(batch)
    if name == "bert-mini":
        return torch.randint(0, 30522, (batch, 24))
    if name in _FAST_INPUT:
        return torch.rand(batch, *_FAST_INPUT[name])
    return spec.example_input(batch)


def _setup(name, seed=0, batch=2, full=False):
    spec = get_model(name)
    torch.manual_seed(seed)
    if name == "vit-tiny" and not full:
        from compress.models.vit import ViT

        model = ViT(image=64).eval()
    else:
        model = spec.build().eval()
    _randomize(model, seed)
    x = _inputs(name, spec, batch, seed, full)
    return spec, model, x


def _removed_after_rule(groups, zero_idx):
    """Groups extraction must remove: all zero ones, except one per layer whose groups are all zero
    (not for heads: the built-in models' attention blocks go whole, returning their out bias)."""
    by_layer = {}
    for i, g in enumerate(groups):
        by_layer.setdefault(g.layer, []).append(i)
    zero = set(zero_idx)
    out = []
    for idx in by_layer.values():
        z = [i for i in idx if i in zero]
        out += z[1:] if len(z) == len(idx) and groups[idx[0]].kind != "head" else z
    return out


def _count_from_shapes(model, groups, removed):
    """Parameters left when every slice (regularized or dependent) of `removed` is deleted."""
    keep = {n: [torch.ones(d, dtype=torch.bool) for d in p.shape] for n, p in model.named_parameters()}
    for i in removed:
        for s in groups[i].slices + groups[i].dependents:
            keep[s.param][s.dim][list(s.indices)] = False
    return sum(int(torch.tensor([int(m.sum()) for m in masks]).prod()) if masks else 1 for masks in keep.values())


def _transformer_count(name, before, groups, removed):
    """Hand formula: a head removes q,k,v rows+biases and out columns; a neuron fc1 row+bias, fc2 column."""
    dim, head_dim = (192, 64) if name == "vit-tiny" else (256, 64)
    per_head = 3 * (dim * head_dim + head_dim) + head_dim * dim
    per_neuron = dim + 1 + dim
    per_pooler = dim + 1 + 2  # pooler row + bias, classifier column
    total = before
    for i in removed:
        g = groups[i]
        if g.kind == "head":
            total -= per_head
        elif g.layer == "pooler":
            total -= per_pooler
        else:
            total -= per_neuron
    return total


def _max_rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize(
    "name,full",
    [pytest.param(n, False, marks=[pytest.mark.slow] if n in SLOW else []) for n in sorted(EXPECTED)]
    + [pytest.param(n, True, marks=pytest.mark.slow) for n in ("mobilenetv2", "vit-tiny", "bert-mini")],
)
def test_half_of_the_groups_removed_exactly(name, full):
    spec, model, x = _setup(name, full=full)
    gl = find_groups(model, x)
    counts = {}
    for g in gl:
        counts[g.kind] = counts.get(g.kind, 0) + 1
    assert counts == EXPECTED[name]
    rng = random.Random(1)
    chosen = sorted(rng.sample(range(len(gl)), len(gl) // 2))
    for i in chosen:
        _zero(gl[i])
    small, rep = extract(model, gl, x)
    removed = _removed_after_rule(gl, chosen)
    assert rep["groups_removed"] == len(removed)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == _count_from_shapes(model, gl, removed) == rep["params_after"]
    if name in ("vit-tiny", "bert-mini"):
        assert n_small == _transformer_count(name, rep["params_before"], gl, removed)
    assert rep["flops_after"] < rep["flops_before"]
    x2 = _inputs(name, spec, 3, seed=7, full=full)  # inputs extraction never saw
    with torch.no_grad():
        ref, out = model(x2), small(x2)
    assert ref.shape == out.shape
    assert _max_rel(ref, out) <= 1e-5
    # the removal really happened and was not a no-op on live structures
    assert n_small < rep["params_before"]


@pytest.mark.parametrize("name", ["vit-tiny", "mobilenetv2"])
def test_all_groups_of_one_layer_zero(name):
    spec, model, x = _setup(name)
    gl = find_groups(model, x)
    layer = "blocks.3.attn" if name == "vit-tiny" else "features.4.conv.0.0"
    for g in gl:
        if g.layer == layer:
            _zero(g)
    small, rep = extract(model, gl, x)
    info = rep["layers"][layer]
    if name == "vit-tiny":  # an attention block with no head left goes entirely (it returns its out bias)
        assert info["kept"] is None and info["removed"] == info["groups"] and "removed" in info["note"]
        assert small.blocks[3].attn.num_heads == 0 and small.blocks[3].attn.q.out_features == 0
    else:
        assert info["kept"] is not None and info["removed"] == info["groups"] - 1
        assert "all" in info["note"] and "kept" in info["note"]
        assert small.features[4].conv[0][0].out_channels == 1 and small.features[4].conv[1][0].groups == 1
    x2 = _inputs(name, spec, 2, seed=3)
    with torch.no_grad():
        assert _max_rel(model(x2), small(x2)) <= 1e-5


def test_digits_vit_random_zero_pattern_extracts_to_the_zeroed_model():
    """Hand count: a head is q,k,v rows (64 in, 16 out) + biases and 16 out columns; a neuron fc1 row + bias and
    an fc2 column. Extracted logits equal the zeroed model's on held-out digits (not the inputs it traced)."""
    from compress.models.digits import digits_datasets

    spec, model, x = _setup("digits-vit")
    assert sum(p.numel() for p in model.parameters()) == 103_434  # patch 1*64*16+64, cls+pos 64+17*64, ...
    gl = find_groups(model, x)
    heads = [i for i, g in enumerate(gl) if g.kind == "head"]
    neurons = [i for i, g in enumerate(gl) if g.kind == "neuron"]
    assert len(heads) == 12 and len(neurons) == 384
    rng = random.Random(5)
    chosen = rng.sample(heads, 5) + rng.sample(neurons, 150)
    chosen += [i for i in heads if gl[i].layer == "blocks.1.attn" and i not in chosen]  # a whole attention block
    for i in chosen:
        _zero(gl[i])
    small, rep = extract(model, gl, x)
    removed = _removed_after_rule(gl, chosen)
    assert len(removed) == len(chosen)  # the block goes entirely: no head stays
    n_heads = sum(1 for i in removed if gl[i].kind == "head")
    expect = 103_434 - n_heads * (3 * (64 * 16 + 16) + 16 * 64) - (len(removed) - n_heads) * (64 + 1 + 64)
    assert sum(p.numel() for p in small.parameters()) == rep["params_after"] == expect
    assert small.blocks[1].attn.num_heads == 0
    _, test = digits_datasets()
    images = test.tensors[0][:64]
    with torch.no_grad():
        ref, out = model(images), small(images)
    assert _max_rel(ref, out) <= 1e-5
    assert rep["flops_after"] < rep["flops_before"]


def test_nothing_zero_keeps_bert_identical():
    spec, model, x = _setup("bert-mini")
    gl = find_groups(model, x)
    small, rep = extract(model, gl, x)
    assert rep["groups_removed"] == 0 and rep["params_after"] == rep["params_before"]
    x2 = _inputs("bert-mini", spec, 2, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x2), small(x2))


def test_bert_attention_mask_still_works_after_head_removal():
    spec, model, x = _setup("bert-mini")
    gl = find_groups(model, x)
    for i, g in enumerate(gl):
        if g.kind == "head" and i % 2 == 0:
            _zero(g)
    small, _ = extract(model, gl, x)
    ids = _inputs("bert-mini", spec, 2, seed=9)
    mask = torch.ones_like(ids)
    mask[:, 64:] = 0
    with torch.no_grad():
        assert _max_rel(model(ids, mask), small(ids, mask)) <= 1e-5
    assert all(b.attn.num_heads == 2 for b in small.blocks)


def _onnx_check(model, small, x, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        small,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    assert _max_rel(ref, got) <= 1e-4


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vit-tiny", "bert-mini", _params("resnet50")])
def test_extracted_model_exports_to_onnx(name, tmp_path):
    spec, model, x = _setup(name, batch=2)
    gl = find_groups(model, x)
    for i in random.Random(2).sample(range(len(gl)), len(gl) // 2):
        _zero(gl[i])
    small, _ = extract(model, gl, x)
    _onnx_check(model, small, x, tmp_path)


# --------------------------------------------------------------------------- Hugging Face


def _hf():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install compress[hf])")


def _hf_bert():
    tf = _hf()
    cfg = tf.BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(cfg).eval()


def _hf_vit():
    tf = _hf()
    cfg = tf.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=5,
    )
    torch.manual_seed(0)
    return tf.ViTForImageClassification(cfg).eval()


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_hugging_face_heads_and_neurons_removed_exactly(which):
    model = _hf_bert() if which == "bert" else _hf_vit()
    _randomize(model, 0)
    if which == "bert":
        ids = torch.randint(0, 500, (2, 16))
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        x = {"input_ids": ids, "attention_mask": mask}
    else:
        x = torch.rand(2, 3, 32, 32)
    gl = find_groups(model, x)
    counts = {}
    for g in gl:
        counts[g.kind] = counts.get(g.kind, 0) + 1
    # 2 layers x 4 heads; 2 x 96 MLP neurons (+ 64 BERT pooler neurons, tanh(0) = 0)
    assert counts == ({"head": 8, "neuron": 2 * 96 + 64} if which == "bert" else {"head": 8, "neuron": 2 * 96})
    reasons = " ".join(r for _, r in gl.not_prunable)
    assert "LayerNorm" in reasons  # the hidden size is never offered
    chosen = random.Random(0).sample(range(len(gl)), len(gl) // 2)
    for i in chosen:
        _zero(gl[i])
    small, rep = extract(model, gl, x)
    removed = _removed_after_rule(gl, chosen)
    assert sum(p.numel() for p in small.parameters()) == _count_from_shapes(model, gl, removed)
    call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))
    with torch.no_grad():
        ref, out = call(model).logits, call(small).logits
    assert _max_rel(ref, out) <= 1e-5
    layers = small.bert.encoder.layer if which == "bert" else small.vit.layers
    for i, layer in enumerate(layers):
        attn = layer.attention.self if which == "bert" else layer.attention
        heads = attn.num_attention_heads
        left = 4 - sum(1 for j in removed if gl[j].kind == "head" and gl[j].layer.endswith(f".{i}.attention"))
        assert heads == left
        q = attn.query if which == "bert" else attn.q_proj
        assert q.out_features == heads * 16
        if which == "bert":
            assert attn.all_head_size == heads * 16
