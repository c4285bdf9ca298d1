"""The command line as a user meets it: one-line errors, exit codes, untouched files, config precedence."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, timeout=None):
    return subprocess.run(
        [sys.executable, "-m", "compress", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
        timeout=timeout,
    )


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_model(tmp_path):
    assert_one_line_error(cli("finetune", "--model", "nope", "--out", tmp_path / "r"), "unknown model", "digits-resnet")
    assert not (tmp_path / "r").exists()


def test_negative_lambda(tmp_path):
    assert_one_line_error(cli("finetune", "--lam", "-1", "--out", tmp_path / "r"), "--lam")


def test_missing_run_dir(tmp_path):
    assert_one_line_error(cli("export", tmp_path / "missing"), "does not exist")
    assert_one_line_error(cli("bench", tmp_path / "missing"), "does not exist")


def test_existing_out_without_force_leaves_files(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text("precious")
    assert_one_line_error(cli("finetune", "--out", out, "--epochs", "1"), "already exists", "--force")
    assert (out / "config.json").read_text() == "precious"


def test_unimportable_factory_and_bad_config(tmp_path):
    assert_one_line_error(cli("finetune", "--model", "no_such_mod:f", "--out", tmp_path / "r"), "cannot import")
    bad = tmp_path / "run.toml"
    bad.write_text("epochz = 3\n")
    assert_one_line_error(cli("finetune", "--config", bad, "--out", tmp_path / "r"), "unknown keys", "epochz")
    bad.write_text('epochs = "three"\n')  # the library names the field, the CLI its flag
    assert_one_line_error(
        cli("finetune", "--config", bad, "--out", tmp_path / "r"), "--epochs must be int, got 'three'"
    )


def test_untrusted_pickle_is_refused(tmp_path):
    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": subprocess.Popen}))  # a global torch's safe loader will not allow
    assert_one_line_error(cli("finetune", "--init", evil, "--out", tmp_path / "r", "--epochs", "1"), "refusing")


def test_debug_shows_traceback(tmp_path):
    res = cli("--debug", "finetune", "--model", "nope", "--out", tmp_path / "r")
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.e2e
def test_end_to_end_with_config_precedence(tmp_path):
    """finetune (TOML + overriding flag) → export → bench → inspect, as a user runs them."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('epochs = 9\nlam = 5e-3\nbatch-size = 128\nmilestones = "1"\n')
    out = tmp_path / "run"
    res = cli("finetune", "--config", cfg, "--epochs", "2", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["epochs"] == 2 and saved["lam"] == 5e-3 and saved["batch_size"] == 128 and saved["milestones"] == [1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    for f in ("groups.json", "weights.safetensors", "checkpoint.safetensors", "init.safetensors", "training.png"):
        assert (out / f).is_file(), f

    res = cli("export", out)
    assert res.returncode == 0, res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["start"] == "random" and "dense_accuracy" not in rep  # a random start is not called "dense"
    for key in (
        "start_accuracy",
        "start_onnx_accuracy",
        "compressed_accuracy",
        "onnx_accuracy",
        "params_dense",
        "params_compressed",
        "flops_dense",
        "flops_compressed",
        "groups_total",
        "groups_removed",
        "max_abs_diff_extract",
        "max_abs_diff_onnx",
    ):
        assert key in rep, key
    assert rep["max_abs_diff_onnx"] <= 1e-4 and rep["max_abs_diff_extract"] <= 1e-5
    assert (out / "model.onnx").is_file() and (out / "dense.onnx").is_file()

    res = cli("bench", out, "--batch", "1,8", "--threads", "1", "--rounds", "5")
    assert res.returncode == 0, res.stderr
    bench = json.loads((out / "bench.json").read_text())
    assert bench  # structure checked in tests/test_bench.py

    res = cli("inspect", out)
    assert res.returncode == 0 and "training" in res.stdout, res.stderr

    res = cli("finetune", "--resume", out)
    assert_one_line_error(res, "already finished")


USER = """
import torch

def raises():
    raise RuntimeError("no GPU weights here")

def not_a_module():
    return 42

def mlp():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

def bad_data():
    return [1, 2, 3]

def wrong_parts():
    return "train", "eval"

def conv():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10))

def token_ids():
    ds = torch.utils.data.TensorDataset(torch.randint(0, 9, (16, 64)), torch.randint(0, 10, (16,)))
    return ds, ds

def digits():
    from compress.models.digits import digits_datasets
    return digits_datasets()
"""


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "{f}:raises"], ["raised RuntimeError", "no GPU weights"]),
        (["--model", "{f}:not_a_module"], ["not a torch.nn.Module"]),
        (["--model", "{f}:missing"], ["no callable 'missing'"]),
        (["--model", "{f}:mlp", "--data", "{f}:token_ids"], ["needs an example input", "--input-shape"]),
        (["--model", "{f}:mlp", "--data", "{f}:bad_data", "--input-shape", "1,1,8,8"], ["must return (train, eval)"]),
        (["--model", "{f}:mlp", "--data", "{f}:wrong_parts", "--input-shape", "1,1,8,8"], ["not a torch Dataset"]),
        (
            ["--model", "{f}:mlp", "--data", "{f}:digits", "--input-shape", "1,3,32,32"],
            ["training inputs have shape 1×8×8 per sample", "3×32×32", "give --input-shape 1,1,8,8"],
        ),
        (
            ["--model", "{f}:conv", "--data", "{f}:digits", "--input-shape", "1,1,8,8"],
            ["forward failed on a training batch of shape (8, 1, 8, 8)", "RuntimeError"],
        ),
        (["--model", "{f}:mlp", "--data", "{f}:digits", "--input-shape", "1,-3"], ["--input-shape must be"]),
        (["--lr", "0"], ["--lr must be positive"]),
        (["--epochs", "0"], ["--epochs must be positive"]),
        (["--model", "missing_file.py:f"], ["does not exist"]),
    ],
)
def test_user_model_and_data_errors(tmp_path, args, needles):
    f = tmp_path / "usermod.py"
    f.write_text(USER)
    res = cli(
        "finetune",
        *[a.format(f=f) for a in args],
        "--out",
        tmp_path / "r",
        "--epochs" if "--epochs" not in args else "--seed",
        "1",
    )
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_custom_model_runs_end_to_end(tmp_path):
    f = tmp_path / "usermod.py"
    f.write_text(USER)
    out = tmp_path / "r"
    res = cli(
        "finetune",
        "--model",
        f"{f}:mlp",
        "--data",
        f"{f}:digits",
        "--input-shape",
        "1,1,8,8",
        "--epochs",
        "2",
        "--lam",
        "1e-2",
        "--out",
        out,
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    res = cli("export", out)
    assert res.returncode == 0, res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["groups_total"] == 32 and rep["max_abs_diff_onnx"] <= 1e-4


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text('{"model": "digits-resnet", "train": {}}')
    assert_one_line_error(cli("finetune", "--resume", out, "--lam", "5"), "only --lr", "--epochs", "not --lam")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--target-flops", "0.5", "--lam", "0.01"], "either --lam or a target"),
        (["--target-flops", "1.5"], "in (0, 1)"),
        (["--target-flops", "0.5", "--target-params", "0.5"], "exactly one budget target"),
        (["--bench-batch", "4"], "only apply to --target-latency-ms"),
        (["--target-flops", "0.0001"], "below the smallest valid model"),
        (["--final-optimizer", "adamw"], "--final-optimizer applies to target runs only"),
        (["--align", "8", "--lam", "0.01"], "--align applies to target runs only"),
        (["--target-flops", "0.5", "--final-optimizer", "sgd"], "--final-optimizer must be adamw or same"),
        (["--target-flops", "0.5", "--align", "0"], "align must be ≥ 1"),
        (["--rewind", "init"], "--rewind applies to target runs only"),
        (["--target-flops", "0.5", "--rewind", "init", "--final-optimizer", "same"], "needs --final-optimizer adamw"),
    ],
)
def test_budget_flag_errors(tmp_path, args, needle):
    res = cli("finetune", *args, "--epochs", "2", "--out", tmp_path / "r")
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.e2e
def test_budget_run_from_the_cli_gets_the_api_defaults_and_its_flags(tmp_path):
    """The CLI used to resolve two lr decays (2,3 of 4 epochs) before the budget API could apply its one
    decay at the freeze; now a target run saves milestones [3], and --final-optimizer/--align reach the
    controller (config.json for resume, the AdamW phase in metrics.jsonl, 8-aligned widths)."""
    out = tmp_path / "r"
    res = cli(
        "finetune",
        "--target-flops",
        "0.5",
        "--epochs",
        "4",
        "--final-optimizer",
        "adamw",
        "--align",
        "8",
        "--threads",
        "1",
        "--out",
        out,
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["milestones"] == [3]
    assert saved["budget_controller"]["final_optimizer"] == "adamw" and saved["budget_controller"]["align"] == 8
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in m] == ["sparsity", "sparsity", "final", "final"]
    assert [r["optimizer"] for r in m] == ["RAMDA", "RAMDA", "RAMDA", "CosineAdamW"]
    b = json.loads((out / "budget.json").read_text())
    assert b["final_optimizer"] == "adamw" and b["achieved"]["flops_fraction"] <= 0.5
    widths = b["freeze"]["alignment"]["widths"]
    assert b["align"] == 8 and all(w % 8 == 0 or w < 8 or w == 32 for w in widths.values()), widths
