"""GPT-2's MLP (Hugging Face Conv1D, weight stored (in, out)): its hidden neurons are offered and
removed exactly. References: the unmodified model with the removed neurons zeroed, and a block
built afresh with the smaller hidden width (FLOPs and parameters must equal it)."""

import math

import pytest
import torch
from layers import Conv1D
from torch import nn

from compress.deploy.export import export_onnx
from compress.deploy.extract import extract
from compress.structure.cost import count_flops, count_params
from compress.structure.cost_model import CostModel
from compress.structure.find import find_groups
from compress.structure.sparsity import zero_mask


class MLPBlock(nn.Module):
    """embed → x + c_proj(gelu_new(c_fc(ln(x)))) → head, as in GPT2Block's MLP half."""

    def __init__(self, e=8, hidden=32):
        super().__init__()
        self.embed, self.ln = nn.Linear(4, e), nn.LayerNorm(e)
        self.c_fc, self.c_proj = Conv1D(hidden, e), Conv1D(e, hidden)
        self.head = nn.Linear(e, 3)

    def forward(self, x):
        x = self.embed(x)
        h = self.c_fc(self.ln(x))
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.head(x + self.c_proj(h))


def test_conv1d_mlp_neurons_are_offered_and_removed_exactly(tmp_path):
    torch.manual_seed(0)
    model, x = MLPBlock().eval(), torch.randn(2, 5, 4)
    gl = find_groups(model, x)
    neurons = [i for i, g in enumerate(gl) if g.layer == "c_fc"]
    assert len(neurons) == 32 and all(gl[i].kind == "neuron" for i in neurons)
    g = gl[neurons[3]]
    assert [(s.param, s.dim, s.indices) for s in g.slices] == [("c_fc.weight", 1, (3,)), ("c_fc.bias", 0, (3,))]
    assert [(s.param, s.dim, s.indices) for s in g.dependents] == [("c_proj.weight", 0, (3,))]

    gone = [neurons[j] for j in range(0, 32, 3)]  # 11 neurons
    with torch.no_grad():
        for i in gone:
            for s, t in zip(gl[i].slices, gl[i].tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
        ref = model(x)  # the unmodified model, those neurons zeroed
    small, rep = extract(model, gl, x)
    assert (small.c_fc.nf, tuple(small.c_fc.weight.shape), small.c_proj.nx) == (21, (8, 21), 21)
    with torch.no_grad():
        assert float((small(x) - ref).abs().max()) <= 1e-5
    fresh = MLPBlock(hidden=21)
    assert count_flops(small, x) == count_flops(fresh, x) == rep["flops_after"]
    assert CostModel(model, gl, x).flops(zero_mask(gl)) == count_flops(fresh, x)
    assert count_params(small) == count_params(fresh) == rep["params_predicted"]
    assert export_onnx(small, x, tmp_path / "m.onnx")["max_abs_diff"] <= 1e-4


def test_hf_gpt2_offers_mlp_neurons_and_heads():
    transformers = pytest.importorskip("transformers", reason="needs the optional transformers package")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, use_cache=False)
    model, x = transformers.GPT2Model(cfg).eval(), torch.randint(0, 50, (1, 6))
    gl = find_groups(model, x)
    kinds = {(g.layer, g.kind) for g in gl}
    assert kinds == {("h.0.attn", "head"), ("h.0.mlp.c_fc", "neuron")}
    assert sum(g.layer == "h.0.mlp.c_fc" for g in gl) == 64
    assert not any("Conv1D" in r for _, r in gl.not_prunable)
