"""Faults during long runs: Ctrl-C, kill -9 during a checkpoint write, corrupted files, read-only dirs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from compress.errors import UserError
from compress.train.checkpoint import (
    load_checkpoint,
    load_into,
    load_weights,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

USER_MODEL = textwrap.dedent('''
    import time
    import torch
    from compress.models.digits import DigitsResNet, digits_datasets

    class Net(DigitsResNet):
        def example_input(self, batch=1):
            return torch.rand(batch, 1, 8, 8)

    def make():
        return Net(channels=4)

    class Slow(torch.utils.data.Dataset):
        """A data set slow enough that the test can interrupt training mid-run."""
        def __init__(self, base, n):
            self.base, self.n = base, n
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            time.sleep(0.002)
            return self.base[i]

    def data():
        tr, te = digits_datasets()
        return Slow(tr, 96), te
''')


@pytest.fixture
def user_model(tmp_path):
    f = tmp_path / "usermodel.py"
    f.write_text(USER_MODEL)
    return f


@pytest.mark.e2e
def test_ctrl_c_writes_resumable_checkpoint_and_resume_finishes(tmp_path, user_model):
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "compress",
        "finetune",
        "--model",
        f"{user_model}:make",
        "--data",
        f"{user_model}:data",
        "--epochs",
        "12",
        "--lam",
        "1e-3",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    info = load_checkpoint(out / "checkpoint.safetensors")["info"]
    assert info["status"] == "running" and info["epoch"] < 12
    res = subprocess.run(
        [sys.executable, "-m", "compress", "finetune", "--resume", str(out), "--quiet"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(out / "checkpoint.safetensors")["info"]["status"] == "done"
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))


WRITER = textwrap.dedent("""
    import sys, torch
    from compress.train.checkpoint import save_checkpoint
    model = torch.nn.Linear(2000, 2000)
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        with torch.no_grad():
            model.weight.fill_(i)
        save_checkpoint(sys.argv[1], model, None, {"i": i})
""")


def test_kill_9_during_checkpoint_write_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)  # must be a whole file, old or new
        i = state["info"]["i"]
        assert torch.all(state["model"]["weight"] == i)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]
    assert len(leftovers) <= 1  # the killed write's temp file at most: later writes remove stale ones


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, torch.nn.Linear(4, 4), None, {"epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupted or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="corrupted or truncated"):
        load_checkpoint(path)


def test_checkpoint_from_another_model_names_first_mismatch(tmp_path):
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, torch.nn.Linear(4, 3), None, {})
    with pytest.raises(UserError, match=r"'weight' has shape \(3, 4\) in the file but \(5, 4\)"):
        load_into(torch.nn.Linear(4, 5), load_weights(path), str(path))
    with pytest.raises(UserError, match="missing"):
        load_into(torch.nn.Sequential(torch.nn.Linear(4, 3)), load_weights(path), str(path))


def _make_unwritable(d: Path):
    """A directory nobody can write to: chattr +i as root (root ignores mode bits), chmod otherwise."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a read-only directory here")
        return lambda: subprocess.run(["chattr", "-i", str(d)])
    d.chmod(0o555)
    return lambda: d.chmod(0o755)


def test_unwritable_run_dir_is_clear_error_and_earlier_file_intact(tmp_path):
    from compress.files import atomic_write_json

    d = tmp_path / "ro"
    d.mkdir()
    atomic_write_json(d / "report.json", {"v": 1})
    undo = _make_unwritable(d)
    try:
        with pytest.raises(UserError, match="cannot write"):
            atomic_write_json(d / "report.json", {"v": 2})
    finally:
        undo()
    assert json.loads((d / "report.json").read_text()) == {"v": 1}
