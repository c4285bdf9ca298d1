"""ONNX export: ORT agrees with torch, dynamic axes really are dynamic, accuracy figures are
right, and a failed export leaves nothing behind (nor touches an existing file)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import compress.deploy.export as ex
import compress.deploy.verify as verify
from compress.deploy.export import export_onnx
from compress.errors import UserError
from compress.models import get_model


class TinyEncoder(nn.Module):
    """One pre-softmax-masked attention block + GELU MLP + LayerNorm, BERT-style inputs."""

    def __init__(self, vocab=50, d=16, heads=2, max_len=64, classes=3):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))[None]
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        att = att + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
        x = self.ln(x + self.fc2(nn.functional.gelu(self.fc1(x))))
        return self.head(x[:, 0]), x  # pooled logits and per-token states (seq-dynamic output)


class SVDHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.spectral = Spectral()

    def forward(self, x):
        return self.spectral(self.body(x))


class Spectral(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x.reshape(-1, 4, 2))[1]  # no ONNX symbolic in either exporter


def _text(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[:, t // 2 + 1 :] = torch.randint(0, 2, (b, t - t // 2 - 1), generator=g)
    return ids, mask


@pytest.fixture(scope="module")
def digits():
    spec = get_model("digits-resnet")
    torch.manual_seed(0)
    model = spec.build().eval()
    # a few Adam steps, so accuracy is neither chance nor perfect and BN statistics are real
    train, _ = spec.data()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is fastest and immune to a busy machine
    try:
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return spec, model


def test_digits_resnet_dynamic_batch_and_accuracy(digits, tmp_path):
    spec, model = digits
    _, test = spec.data()
    path = tmp_path / "digits.onnx"
    rep = export_onnx(model, spec.example_input(1), path, eval_data=test)
    assert path.is_file() and rep["file_bytes"] == path.stat().st_size
    assert rep["opset"] >= 17 and rep["max_abs_diff"] <= 1e-4 and rep["max_rel_diff"] <= 1e-4
    onnx.checker.check_model(onnx.load(path), full_check=True)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in (1, 7):
        x = torch.rand(b, 1, 8, 8)
        got = sess.run(None, {name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (b, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # accuracy, computed independently: torch over the whole set at once, ORT sample by sample
    xs, ys = test.tensors
    with torch.no_grad():
        torch_acc = int((model(xs).argmax(1) == ys).sum()) / len(ys)
    onnx_pred = [int(sess.run(None, {name: xs[i : i + 1].numpy()})[0].argmax()) for i in range(len(ys))]
    onnx_acc = float(np.mean(np.array(onnx_pred) == ys.numpy()))
    assert rep["eval_samples"] == len(ys)
    assert rep["torch_accuracy"] == pytest.approx(torch_acc, abs=1e-12)
    assert rep["onnx_accuracy"] == pytest.approx(onnx_acc, abs=1e-12)
    assert 0.3 < torch_acc < 1.0  # a real, non-degenerate figure


def test_eval_data_as_batches_matches_dataset(digits, tmp_path):
    spec, model = digits
    _, test = spec.data()
    xs, ys = test.tensors
    batches = [(xs[i : i + 50], ys[i : i + 50]) for i in range(0, 200, 50)]
    rep = export_onnx(model, xs[:1], tmp_path / "m.onnx", eval_data=batches)
    with torch.no_grad():
        acc = int((model(xs[:200]).argmax(1) == ys[:200]).sum()) / 200
    assert rep["eval_samples"] == 200 and rep["torch_accuracy"] == pytest.approx(acc)
    assert rep["onnx_accuracy"] == pytest.approx(acc)


def test_text_model_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(1)
    model = TinyEncoder().eval()
    path = tmp_path / "text.onnx"
    rep = export_onnx(model, _text(1, 12, 0), path)
    assert rep["input_names"] == ["input_ids", "attention_mask"]
    assert rep["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "seq"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_types = {i.name: i.type for i in sess.get_inputs()}
    assert in_types == {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)"}
    for b, t in ((1, 5), (7, 5), (7, 23), (3, 40)):
        ids, mask = _text(b, t, seed=b * 100 + t)
        logits, states = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            want_logits, want_states = model(ids, mask)
        assert states.shape == (b, t, 16)
        np.testing.assert_allclose(logits, want_logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(states, want_states.numpy(), rtol=1e-4, atol=1e-5)


def test_static_batch_when_asked(digits, tmp_path):
    spec, model = digits
    path = tmp_path / "static.onnx"
    export_onnx(model, spec.example_input(4), path, dynamic_batch=False)
    shape = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert shape == [4, 1, 8, 8]


def test_unsupported_op_names_op_and_module_and_leaves_nothing(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(UserError) as e:
        export_onnx(SVDHead().eval(), torch.rand(2, 8), path)
    msg = str(e.value)
    assert "linalg_svd" in msg and "spectral (Spectral)" in msg
    assert os.listdir(tmp_path) == []


def test_verification_failure_names_mismatch_and_keeps_old_file(digits, tmp_path, monkeypatch):
    spec, model = digits
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    real = verify.torch_run

    def skewed(model, inputs, device):
        outs = real(model, inputs, device)
        outs[0][0, 3] += 0.01  # torch "disagrees" with ORT at output[0, 3]
        return outs

    monkeypatch.setattr(verify, "torch_run", skewed)
    with pytest.raises(UserError) as e:
        export_onnx(model, spec.example_input(1), path)
    msg = str(e.value)
    assert "'output'[0, 3]" in msg and "disagrees" in msg
    assert path.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_exporter_crash_falls_back_then_cleans_up(digits, tmp_path, monkeypatch):
    spec, model = digits

    def boom(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setitem(ex._EXPORTERS, "torchscript", boom)
    monkeypatch.setitem(ex._EXPORTERS, "dynamo", boom)
    with pytest.raises(UserError, match="exporter exploded"):
        export_onnx(model, spec.example_input(1), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_exporter_quiet(digits, tmp_path, capfd):
    spec, model = digits
    export_onnx(model, spec.example_input(1), tmp_path / "m.onnx", exporter="torchscript")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.slow
def test_dynamo_exporter_single_file_and_quiet(digits, tmp_path, capfd):
    spec, model = digits
    rep = export_onnx(model, spec.example_input(1), tmp_path / "m.onnx", exporter="dynamo")
    out, err = capfd.readouterr()
    assert rep["exporter"] == "dynamo" and rep["max_abs_diff"] <= 1e-4
    assert os.listdir(tmp_path) == ["m.onnx"] and out == "" and err == ""


def test_simplify_reverified(digits, tmp_path, monkeypatch):
    onnxslim = pytest.importorskip("onnxslim", reason="onnxslim not installed (optional: simplify=True)")
    spec, model = digits
    rep = export_onnx(model, spec.example_input(1), tmp_path / "m.onnx", simplify=True)
    assert rep["simplified"] and rep["max_abs_diff"] <= 1e-4
    assert rep["file_bytes"] == (tmp_path / "m.onnx").stat().st_size

    real = onnxslim.slim

    def broken_slim(proto, *a, **k):  # a simplifier bug: perturbs the first weight tensor
        from onnx import numpy_helper

        out = real(proto, *a, **k)
        init = next(t for t in out.graph.initializer if t.data_type == 1 and len(t.dims) == 4)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, init.name))
        return out

    monkeypatch.setattr(onnxslim, "slim", broken_slim)
    with pytest.raises(UserError, match="disagrees"):
        export_onnx(model, spec.example_input(1), tmp_path / "bad.onnx", simplify=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def _builtin_names():
    from compress.models import model_names

    return model_names()


@pytest.mark.slow
@pytest.mark.parametrize("name", _builtin_names())
def test_every_builtin_model_exports_and_agrees(name, tmp_path):
    spec = get_model(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    rep = export_onnx(model, spec.example_input(1), tmp_path / f"{name}.onnx")
    assert rep["max_abs_diff"] <= 1e-4 and rep["max_rel_diff"] <= 1e-4
    assert [c["inputs"][0][0] for c in rep["verify_checks"]][:2] == [1, 7]  # batch 1 and 7 both ran in ORT
    assert os.listdir(tmp_path) == [f"{name}.onnx"]
