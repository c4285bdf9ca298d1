"""INT8 quantization: the calibration sample is deterministic, the INT8 file passes onnx.checker and its
reported accuracy is what ORT gives, too large a loss is refused, bad calibration input fails cleanly,
and no refusal or error leaves a file behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress.deploy.calibration import split
from compress.deploy.quantize import quantize_onnx
from compress.errors import UserError

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*TorchScript-based ONNX export:DeprecationWarning", "ignore:The feature will be removed:DeprecationWarning"
)
ROOT = Path(__file__).resolve().parents[1]
FAST = {"rounds": 3, "batch_sizes": (1,)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small conv classifier (random weights) exported the way a user would, and 600 inputs whose
    labels are its own FP32 predictions (so FP32 accuracy is 100% by construction)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    ).eval()
    path = tmp_path_factory.mktemp("q") / "fp32.onnx"
    torch.onnx.export(
        net,
        (torch.rand(1, 1, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        opset_version=17,
    )
    x = np.random.default_rng(1).random((600, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        labels = net(torch.from_numpy(x)).argmax(1).numpy()
    return path, x, labels


def ort_out(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def test_calibration_sample_is_seeded_and_sorted():
    a, rest = split(1000, 256, seed=0)
    b, _ = split(1000, 256, seed=0)
    c, _ = split(1000, 256, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 256 and len(np.unique(a)) == 256 and np.all(np.diff(a) > 0)
    assert sorted(set(a) | set(rest)) == list(range(1000)) and not set(a) & set(rest)
    assert np.array_equal(a, np.sort(np.random.default_rng(0).choice(1000, 256, replace=False)))
    small, held = split(100, 256, seed=0)  # fewer samples than asked: all calibrate, none left
    assert np.array_equal(small, np.arange(100)) and len(held) == 0


def test_a_later_form_must_be_measurably_faster_to_win():
    from compress.deploy.quantize import _fastest

    def forms(*ratios):
        return [{"form": f, "latency": {"ratio": r}} for f, r in zip(("qoperator", "qdq", "dynamic"), ratios)]

    assert _fastest(forms(1.0, 0.98))["form"] == "qoperator"  # within noise: the first form stays
    assert _fastest(forms(1.0, 0.96))["form"] == "qdq"
    assert _fastest(forms(1.0, 0.96, 0.95))["form"] == "qdq"
    assert _fastest(forms(1.0, 1.2, 0.5))["form"] == "dynamic"


def test_same_inputs_give_the_same_int8_file(tiny, tmp_path):
    path, x, labels = tiny
    data = {"x": x, "labels": labels}
    r1 = quantize_onnx(path, tmp_path / "a.onnx", data, forms=["qoperator"], **FAST)
    r2 = quantize_onnx(path, tmp_path / "b.onnx", data, forms=["qoperator"], **FAST)
    r3 = quantize_onnx(path, tmp_path / "c.onnx", data, forms=["qoperator"], seed=7, **FAST)
    assert r1["calibration_indices"] == r2["calibration_indices"] != r3["calibration_indices"]
    a, b, c = ((tmp_path / f"{n}.onnx").read_bytes() for n in "abc")
    assert a == b and a != c  # another sample gives other activation ranges


def test_int8_file_is_valid_and_its_report_is_what_ort_measures(tiny, tmp_path):
    path, x, labels = tiny
    out = tmp_path / "int8.onnx"
    rep = quantize_onnx(path, out, {"x": x, "labels": labels}, **FAST)
    onnx.checker.check_model(str(out))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops & {"QLinearConv", "QuantizeLinear", "ConvInteger"}, ops
    assert rep["form"] in ("qoperator", "qdq") and set(rep["candidates"]) == {"qoperator", "qdq"}  # no MatMul here
    held = np.setdiff1d(np.arange(600), rep["calibration_indices"])
    assert len(held) == 600 - 256 and not rep["held_out_is_calibration"]
    ref, got = ort_out(path, x[held]), ort_out(out, x[held])
    assert rep["kind"] == "accuracy" and rep["fp32_accuracy"] == 100.0
    assert rep["int8_accuracy"] == pytest.approx(100.0 * (got.argmax(1) == labels[held]).mean())
    assert rep["max_abs_diff"] == pytest.approx(np.abs(ref - got).max(), rel=1e-6)
    assert 0 < rep["mean_abs_diff"] < rep["max_abs_diff"]
    assert rep["drop"] <= 1.0
    lat = rep["latency"]["by_batch"]["1"]
    assert lat["fp32_ms"] > 0 and lat["int8_ms"] > 0
    assert rep["recommended"] == str(out if lat["int8_ms"] < lat["fp32_ms"] else path)


def test_too_large_a_loss_is_refused_and_nothing_is_written(tiny, tmp_path):
    """Calibrated on inputs 100x smaller than the held-out ones, static INT8 clips every activation."""
    path, x, labels = tiny
    out = tmp_path / "int8.onnx"
    with pytest.raises(UserError) as e:
        quantize_onnx(path, out, {"x": x * 0.01}, eval_data={"x": x, "labels": labels}, forms=["qoperator"], **FAST)
    msg = str(e.value)
    assert "\n" not in msg and "accuracy points" in msg and "nothing written" in msg and "--" not in msg
    assert leftovers(tmp_path, set()) == []
    # without labels the check is cosine to FP32: no INT8 model is exact, so a zero allowance refuses
    with pytest.raises(UserError, match="cosine"):
        quantize_onnx(path, out, {"x": x}, forms=["qoperator"], max_accuracy_drop=0.0, **FAST)
    assert leftovers(tmp_path, set()) == []


def test_a_fixed_batch_model_is_calibrated_checked_and_timed_at_its_batch(tiny, tmp_path):
    """Exported without a dynamic batch axis, at batch 4: 600 samples → 256 calibrate, 344 checked."""
    x = tiny[1]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(net, (torch.rand(4, 1, 8, 8),), str(path), dynamo=False, input_names=["x"], opset_version=17)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    rep = quantize_onnx(
        path, tmp_path / "fixed.int8.onnx", {"x": x, "labels": y}, forms=["qoperator"], rounds=2, max_accuracy_drop=5
    )  # a random net has near-ties: the check here is the batching
    assert set(rep["latency"]["by_batch"]) == {"4"} and rep["fp32_accuracy"] == 100.0
    assert rep["held_out_samples"] == 344 and rep["calibration_samples"] == 256


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p, x: p.write_bytes(b"PK\x03\x04 this is not a zip archive"), "not a readable .npz"),
        (lambda p, x: np.savez(p, inputs=x, other=x), "lacks the model input(s) ['x']"),
        (lambda p, x: np.savez(p, x=np.where(x > 0.5, np.nan, x)), "NaN"),
        (lambda p, x: np.savez(p, x=x[:, :, :4]), "shape"),
        (lambda p, x: np.savez(p, x=(x * 10).astype(np.int64)), "int64"),
        (lambda p, x: np.savez(p, x=x, labels=np.zeros(3, np.int64)), "number of samples"),
    ],
)
def test_bad_calibration_file_is_a_clear_error_and_leaves_no_file(tiny, tmp_path, make, needle):
    path, x, _ = tiny
    cal = tmp_path / "cal.npz"
    make(cal, x)
    with pytest.raises(UserError) as e:
        quantize_onnx(path, tmp_path / "int8.onnx", cal, **FAST)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert leftovers(tmp_path, {"cal.npz"}) == []


def test_cli_quantizes_a_foreign_onnx_file(tiny, tmp_path):
    path, x, labels = tiny
    np.savez(tmp_path / "cal.npz", x=x, labels=labels)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress",
            "quantize",
            str(path),
            "--calibration",
            str(tmp_path / "cal.npz"),
            "--out",
            str(tmp_path / "m.int8.onnx"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m.int8.onnx").is_file() and "Recommended file" in res.stdout
    (tmp_path / "bad.npz").write_text("garbage")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "compress",
            "quantize",
            str(path),
            "--calibration",
            str(tmp_path / "bad.npz"),
            "--out",
            str(tmp_path / "n.int8.onnx"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not a readable .npz archive" in lines[0], res.stderr
    assert not (tmp_path / "n.int8.onnx").exists()


def test_run_export_quantize_and_bench(tmp_path):
    """finetune (1 epoch) → export --quantize int8 → bench: four files side by side, report notes."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def cli(*a):
        return subprocess.run(
            [sys.executable, "-m", "compress", *map(str, a)], capture_output=True, text=True, check=False, env=env
        )

    out = tmp_path / "run"
    assert cli("finetune", "--epochs", "1", "--lam", "5e-2", "--out", out, "--quiet").returncode == 0
    res = cli("export", out, "--quantize", "int8")
    assert res.returncode == 0, res.stderr
    q = json.loads((out / "quantize.json").read_text())
    assert q["calibration"]["samples"] == 256 and q["held_out"]["source"] == "test data"
    m = q["files"]["model.onnx"]
    assert m["kind"] == "accuracy" and m["drop"] <= 1.0 and (out / "model.int8.onnx").is_file()
    rep = json.loads((out / "report.json").read_text())
    assert rep["recommended_file"] in ("model.onnx", "model.int8.onnx") and rep["int8"]["form"] == m["form"]
    res = cli("bench", out, "--batch", "1,8", "--threads", "1", "--rounds", "3")
    assert res.returncode == 0, res.stderr
    b = json.loads((out / "bench_int8.json").read_text())
    assert set(b["median_ms"]) == {"1", "8"}
    assert {"dense.onnx", "model.onnx", "model.int8.onnx"} <= set(b["median_ms"]["1"])
    assert "pruned INT8" in res.stdout
    # exported again without --quantize: the INT8 file no longer matches model.onnx and is not benchmarked
    model = out / "model.onnx"
    os.utime(model, (model.stat().st_atime, (out / "model.int8.onnx").stat().st_mtime + 10))
    from compress.deploy.quantrun import bench_quantized

    assert bench_quantized(out, batch_sizes=(1,), rounds=1) is None
