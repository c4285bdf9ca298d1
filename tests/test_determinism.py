"""Same command, same seed → the same bits: two straight runs, and a straight run against the same run
interrupted with Ctrl-C and resumed. Compared by the sha256 of every weight file (init, structured point)
and tensor by tensor, so a single flipped bit fails."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_reliability import ENV, ROOT, USER_MODEL

ARGS = ["--epochs", "4", "--lam", "1e-2", "--batch-size", "32", "--seed", "3", "--quiet"]


def finetune(model_file: Path, out: Path, *extra, args=ARGS, env=ENV):
    cmd = [sys.executable, "-m", "compress", "finetune", "--model", f"{model_file}:make", "--data",
           f"{model_file}:data", *args, "--out", str(out), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_run(a: Path, b: Path):
    for name in ("init.safetensors", "weights.safetensors", "checkpoint.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
            assert ta[k].numpy().tobytes() == tb[k].numpy().tobytes(), (name, k)
        assert sha(a / name) == sha(b / name), name
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == [
        {k: v for k, v in m.items() if k not in drop} for m in mb
    ]


@pytest.fixture
def model_file(tmp_path):
    f = tmp_path / "usermodel.py"
    f.write_text(USER_MODEL)
    return f


@pytest.mark.e2e
def test_same_command_twice_gives_identical_bits(tmp_path, model_file):
    for name in ("a", "b"):
        res = finetune(model_file, tmp_path / name)
        assert res.returncode == 0, res.stderr
    assert_same_run(tmp_path / "a", tmp_path / "b")
    res = finetune(model_file, tmp_path / "c", "--seed", "4")  # and the seed matters: the test can fail
    assert res.returncode == 0, res.stderr
    assert sha(tmp_path / "a" / "init.safetensors") != sha(tmp_path / "c" / "init.safetensors")


@pytest.mark.e2e
def test_interrupted_and_resumed_run_equals_straight_run(tmp_path, model_file):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    res = finetune(model_file, straight)
    assert res.returncode == 0, res.stderr
    cmd = [
        sys.executable,
        "-m",
        "compress",
        "finetune",
        "--model",
        f"{model_file}:make",
        "--data",
        f"{model_file}:data",
        *ARGS,
        "--out",
        str(broken),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (broken / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # after the first epoch's checkpoint: Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not (broken / "weights.safetensors").exists()  # really stopped before the end
    res = subprocess.run(
        [sys.executable, "-m", "compress", "finetune", "--resume", str(broken), "--quiet"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert_same_run(straight, broken)


@pytest.mark.e2e
def test_budget_run_twice_gives_identical_bits(tmp_path, model_file):
    """A budget run's freeze keeps alignment only where ONNX Runtime measures it faster; the measurements
    are kept per machine (compress.budget.latency_memo), so the second run freezes the same structure."""
    env = {**ENV, "COMPRESS_CACHE": str(tmp_path / "cache")}
    args = [a for a in ARGS if a not in ("--lam", "1e-2")]
    for name in ("a", "b"):
        res = finetune(model_file, tmp_path / name, "--target-flops", "0.5", "--init", "random", args=args, env=env)
        assert res.returncode == 0, res.stderr
    assert_same_run(tmp_path / "a", tmp_path / "b")
    ba, bb = (json.loads((tmp_path / n / "budget.json").read_text()) for n in ("a", "b"))
    assert ba.get("alignment_measured") == bb.get("alignment_measured")


def test_latency_memo_round_trip(tmp_path, monkeypatch):
    import torch

    from compress.budget.latency_memo import MeasuredLatencies

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    net, x = torch.nn.Linear(4, 3), torch.zeros(1, 4)
    memo = MeasuredLatencies(net, x, "b1 t1")
    assert memo.get({"fc": 16}) is None
    memo.put({"fc": 16}, 0.5)
    again = MeasuredLatencies(net, x, "b1 t1")
    assert again.get({"fc": 16}) == 0.5 and again.get({"fc": 8}) is None
    assert MeasuredLatencies(net, x, "b32 t1").get({"fc": 16}) is None  # another setting is another table
    assert MeasuredLatencies(torch.nn.Linear(4, 5), x, "b1 t1").get({"fc": 16}) is None  # another architecture
    again.path.write_text("{not json")
    assert MeasuredLatencies(net, x, "b1 t1").get({"fc": 16}) is None  # a corrupt file is ignored
