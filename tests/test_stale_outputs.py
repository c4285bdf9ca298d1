"""Outputs stay consistent (issue 19, item 7): a re-export removes the bench of the previous export, a
bench records the files it measured and inspect says when they changed, two ONNX files with different
signatures are not compared, and an output path is checked before the benchmark runs."""

import json
import shutil
import subprocess

import pytest
import torch

import compress
from compress.deploy.pipeline import bench_run, export_run
from compress.errors import UserError
from compress.request import FinetuneOptions, finetune_from
from tests.test_cli import assert_one_line_error, cli
from tests.test_extend import SMALL


@pytest.fixture
def run(tmp_path):
    f = tmp_path / "small.py"
    f.write_text(SMALL)
    out = tmp_path / "run"
    finetune_from(
        FinetuneOptions(
            out=out,
            model=f"{f}:make",
            data=f"{f}:data",
            input_shape="1,1,8,8",
            epochs=1,
            lam=1e-2,
            threads=1,
            init="random",
        ),
        progress=False,
    )
    export_run(out)
    return out


def small_bench(run):
    return bench_run(run, batch_sizes=(1,), threads=(1,), rounds=3)


def test_reexport_removes_the_old_bench_and_inspect_tells_stale(run):
    small_bench(run)
    bench = json.loads((run / "bench.json").read_text())
    assert set(bench["files"]) == {"dense.onnx", "model.onnx"}
    export_run(run)
    assert not (run / "bench.json").exists() and not (run / "bench.png").exists()
    small_bench(run)
    shown = cli("inspect", run).stdout
    assert "stale" not in shown
    shutil.copy(run / "dense.onnx", run / "model.onnx")  # the file measured is not the file there now
    res = cli("inspect", run)
    assert res.returncode == 0 and "stale:" in res.stdout and "compress bench" in res.stdout, res.stdout


def onnx_pair(tmp_path, a_out=10, b_out=10, b_in=64):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    compress.export_onnx(torch.nn.Linear(64, a_out).eval(), torch.rand(1, 64), a)
    compress.export_onnx(torch.nn.Linear(b_in, b_out).eval(), torch.rand(1, b_in), b)
    return a, b


@pytest.mark.parametrize(
    "b_out, b_in, needle",
    [
        (5, 64, "output 0 of a.onnx is float32[?, 10] but of b.onnx float32[?, 5]"),
        (10, 32, "input 0 of a.onnx is float32[?, 64] but of b.onnx float32[?, 32]"),
    ],
)
def test_bench_refuses_models_with_other_signatures(tmp_path, b_out, b_in, needle):
    a, b = onnx_pair(tmp_path, b_out=b_out, b_in=b_in)
    res = cli("bench", a, b, "--batch", "1", "--threads", "1", "--rounds", "3")
    assert_one_line_error(res, needle, "cannot be compared")
    with pytest.raises(UserError, match="cannot be compared"):
        compress.benchmark(a, b, batch_sizes=(1,), threads=(1,), rounds=3)


def test_bench_out_is_checked_before_the_benchmark(tmp_path):
    a, b = onnx_pair(tmp_path)
    slow = ["--batch", "1", "--threads", "1", "--rounds", "100000000"]  # hours, if it ran first
    try:
        res = cli("bench", a, b, *slow, "--out", tmp_path / "missing" / "b.json", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the benchmark ran before the output path was checked")
    assert_one_line_error(res, "directory", "does not exist")
    assert_one_line_error(cli("bench", a, b, *slow, "--out", tmp_path, timeout=120), "is a directory")
    res = cli("bench", a, b, "--batch", "1", "--threads", "1", "--rounds", "3", "--out", tmp_path / "b.json")
    assert res.returncode == 0 and json.loads((tmp_path / "b.json").read_text())["results"], res.stderr
