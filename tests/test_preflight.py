"""The preflight (issue 19, items 3 and 4): a user's data or model mistake is one line naming the problem
and the fix, exit 2, and no run directory; the example input comes from the data when no shape is given;
a dict/tuple output is trained on its logits (or the entry `--output` names)."""

import json

import pytest
import torch

from compress.preflight import first_batch, preflight
from tests.test_cli import assert_one_line_error, cli

DATA = """
import torch
from compress.models.digits import digits_datasets

def _small(fix_x=lambda x: x, fix_y=lambda y: y):
    tr, te = digits_datasets()
    x, y = tr.tensors[0][:64], tr.tensors[1][:64]
    ds = torch.utils.data.TensorDataset(fix_x(x), fix_y(y))
    return ds, ds

def good():
    return _small()

def float_labels():
    return _small(fix_y=lambda y: y.float())

def one_hot():
    return _small(fix_y=lambda y: torch.nn.functional.one_hot(y, 10).float())

def out_of_range():
    return _small(fix_y=lambda y: y + 1)

def wide_images():
    return _small(fix_x=lambda x: torch.nn.functional.pad(x, (0, 2, 0, 2)))

def empty():
    ds = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    return ds, ds

class Net(torch.nn.Module):
    def __init__(self, form="tensor"):
        super().__init__()
        self.form = form
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                        torch.nn.Linear(16, 10))
    def forward(self, x):
        y = self.body(x)
        return {"tensor": y, "dict": {"hidden": x, "logits": y}, "scores": {"scores": y, "aux": y.sum()},
                "tuple": (y, x)}[self.form]

def plain():
    return Net()

def with_logits():
    return Net("dict")

def scores():
    return Net("scores")

def pair():
    return Net("tuple")
"""


@pytest.fixture
def f(tmp_path):
    p = tmp_path / "mine.py"
    p.write_text(DATA)
    return p


def finetune(f, out, model, data, *extra):
    return cli(
        "finetune",
        "--model",
        f"{f}:{model}",
        "--data",
        f"{f}:{data}",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--out",
        out,
        "--quiet",
        *extra,
    )


@pytest.mark.parametrize(
    "model, data, extra, needles",
    [
        ("plain", "float_labels", [], ["labels are float32", "int64 class indices", "y.long()"]),
        ("plain", "one_hot", [], ["labels are one-hot (10 columns)", "y.argmax(1)"]),
        ("plain", "out_of_range", [], ["labels range over 1..10", "model outputs 10 classes", "0..9"]),
        (
            "plain",
            "wide_images",
            [],
            ["forward failed on a training batch of shape (8, 1, 10, 10)", "inputs do not fit the model"],
        ),
        (
            "plain",
            "good",
            ["--input-shape", "1,1,10,10"],
            ["training inputs have shape 1×8×8", "--input-shape 1,1,8,8"],
        ),
        ("plain", "empty", [], ["training data is empty"]),
        ("scores", "good", [], ["returns a dict with keys scores, aux", "give --output with the key of its logits"]),
        ("pair", "good", [], ["returns a tuple of 2", "give --output with the index of its logits (e.g. 0)"]),
        ("pair", "good", ["--output", "5"], ["--output must be an index 0..1"]),
        ("with_logits", "good", ["--output", "nope"], ["--output 'nope' is not among", "hidden, logits"]),
        ("plain", "good", ["--output", "logits"], ["model returns a single tensor", "leave --output out"]),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(tmp_path, f, model, data, extra, needles):
    out = tmp_path / "run"
    assert_one_line_error(finetune(f, out, model, data, *extra), *needles)
    assert not out.exists()


def test_toml_type_error_writes_nothing(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = "ten"\n')
    assert_one_line_error(
        cli("finetune", "--config", toml, "--out", tmp_path / "run"), "--epochs must be int, got 'ten'"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("model, extra", [("plain", []), ("with_logits", []), ("pair", ["--output", "0"])])
def test_shape_from_data_and_selected_outputs_train_and_export(tmp_path, f, model, extra):
    """No --input-shape: the data's shape is recorded (export and resume rebuild the same example)."""
    out = tmp_path / "run"
    res = finetune(f, out, model, "good", "--lam", "1e-2", *extra)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["input_shape"] == "1,1,8,8"
        and cfg["output"] == {"plain": None, "with_logits": "logits", "pair": "0"}[model]
    )
    res = cli("export", out)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "report.json").read_text())["max_abs_diff_onnx"] <= 1e-4


def test_preflight_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10)
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ds = torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    x, y = first_batch(ds)
    preflight(net, x, y, torch.rand(1, 1, 8, 8))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers too
    assert all(p.grad is None for p in net.parameters()) and net.training


@pytest.mark.parametrize("extra", [["--input-shape", "1,1,8,8"], ["--data", "{f}:good"]])
def test_inspect_takes_the_shape_or_the_data(f, extra):
    res = cli("inspect", "--model", f"{f}:plain", *[a.format(f=f) for a in extra])
    assert res.returncode == 0, res.stderr
    assert "16 removable groups" in res.stdout and "neuron 16" in res.stdout
    assert_one_line_error(cli("inspect", "--model", f"{f}:plain"), "needs an example input", "--input-shape")
