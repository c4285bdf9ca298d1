"""`resume` with more `epochs` makes an interrupted or finished run longer (issue 19, item 8)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compress.errors import UserError
from compress.request import FinetuneOptions, finetune_from
from tests.test_cli import assert_one_line_error, cli

SMALL = """
import torch
from compress.models.digits import DigitsResNet, digits_datasets

def make():
    return DigitsResNet(channels=4)

def data():
    tr, te = digits_datasets()
    ds = torch.utils.data.TensorDataset
    return ds(*(t[:128] for t in tr.tensors)), ds(*(t[:64] for t in te.tensors))
"""


@pytest.fixture
def small(tmp_path):
    f = tmp_path / "small.py"
    f.write_text(SMALL)
    return {
        "model": f"{f}:make",
        "data": f"{f}:data",
        "input_shape": "1,1,8,8",
        "lam": 1e-2,
        "threads": 1,
        "batch_size": 32,
        "init": "random",
    }


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_extending_a_finished_run_equals_the_longer_run(tmp_path, small):
    """2 epochs then resumed to 4 = 4 epochs straight, bit for bit (same milestones: the schedule of the
    extension is the documented one — milestones kept, lr at its last value)."""
    finetune_from(FinetuneOptions(out=tmp_path / "long", epochs=4, milestones="1", **small), progress=False)
    finetune_from(FinetuneOptions(out=tmp_path / "ext", epochs=2, milestones="1", **small), progress=False)
    assert len(metrics(tmp_path / "ext")) == 2
    finetune_from(FinetuneOptions(epochs=4), resume=tmp_path / "ext", progress=False)
    assert json.loads((tmp_path / "ext" / "config.json").read_text())["train"]["epochs"] == 4
    a, b = metrics(tmp_path / "long"), metrics(tmp_path / "ext")
    assert [m["epoch"] for m in b] == [1, 2, 3, 4] and [m["lr"] for m in a] == [m["lr"] for m in b]
    wa, wb = load_file(tmp_path / "long" / "weights.safetensors"), load_file(tmp_path / "ext" / "weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(UserError, match="already finished; make it longer") as e:
        finetune_from(FinetuneOptions(), resume=tmp_path / "ext", progress=False)
    with pytest.raises(UserError, match="has trained 4 epochs; epochs must be more than that") as e:
        finetune_from(FinetuneOptions(epochs=3), resume=tmp_path / "ext", progress=False)
    assert e.value.field == "epochs"


def test_cosine_schedule_is_stretched(tmp_path, small):
    out = tmp_path / "cos"
    finetune_from(
        FinetuneOptions(
            out=out,
            epochs=2,
            schedule="cosine",
            optimizer="adamw",
            lam=0.0,
            **{k: v for k, v in small.items() if k != "lam"},
        ),
        progress=False,
    )
    lr = json.loads((out / "config.json").read_text())["train"]["lr"]
    finetune_from(FinetuneOptions(epochs=4), resume=out, progress=False)
    got = [m["lr"] for m in metrics(out)]
    assert got[:2] == [lr, pytest.approx(lr * 0.5)] and got[2:] == [
        pytest.approx(lr * 0.5),
        pytest.approx(lr * 0.5 * (1 - 0.5**0.5)),
    ]


def test_extension_from_the_command_line_and_not_for_budget_runs(tmp_path, small):
    out = tmp_path / "r"
    finetune_from(FinetuneOptions(out=out, epochs=1, **small), progress=False)
    res = cli("finetune", "--resume", out, "--epochs", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    assert len(metrics(out)) == 2
    cfg = json.loads((out / "config.json").read_text())
    cfg["budget"] = {"flops": 0.5}
    (out / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("finetune", "--resume", out, "--epochs", "3"), "budget run", "--epochs cannot be changed")
