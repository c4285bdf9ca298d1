"""Where a run starts (issue 19, item 2): a sparse run never starts from random weights silently;
`init` dense trains a built-in model's dense baseline once and caches it; a random start is reported
as "start", never as "dense"."""

import json

import pytest
from rich.console import Console

from compress.errors import UserError
from compress.request import FinetuneOptions, finetune_from
from compress.train import baseline
from tests.test_cli import cli


@pytest.fixture
def short_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(baseline.RECIPE, "epochs", 4)


def run(out, **kw):
    console = Console(record=True, width=200)
    finetune_from(FinetuneOptions(out=out, epochs=1, threads=1, **kw), console=console, progress=False)
    return console.export_text()


def test_init_dense_trains_the_baseline_once_and_starts_from_it(tmp_path, short_recipe):
    text = run(tmp_path / "a", init="dense", lam=1e-3)
    cached = tmp_path / "cache" / "dense" / "digits-resnet-seed0"
    assert "training the dense baseline of digits-resnet" in text and str(cached) in text
    base = [json.loads(x) for x in (cached / "metrics.jsonl").read_text().splitlines()]
    assert len(base) == 4 and base[-1]["accuracy"] > 0.9 and base[-1]["group_sparsity"] == 0
    assert json.loads((cached / "config.json").read_text())["train"]["optimizer"] == "adamw"
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["init"] == str(cached / "weights.safetensors")
    first = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert first[0]["accuracy"] > 0.8  # fine-tuned from the baseline, not from random weights
    stamp = (cached / "weights.safetensors").stat().st_mtime_ns
    text = run(tmp_path / "b", init="dense", lam=1e-3)
    assert "the cached dense baseline" in text and "training the dense" not in text
    assert (cached / "weights.safetensors").stat().st_mtime_ns == stamp


def test_init_dense_needs_a_builtin_model(tmp_path, short_recipe):
    f = tmp_path / "m.py"
    f.write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(64, 10)\n"
        "def data():\n    from compress.models.digits import digits_datasets\n"
        "    tr, te = digits_datasets()\n    f = lambda d: torch.utils.data.TensorDataset(d.tensors[0]"
        ".flatten(1), d.tensors[1])\n    return f(tr), f(te)\n"
    )
    with pytest.raises(UserError, match="trains the recipe of a built-in model") as e:
        run(tmp_path / "r", model=f"{f}:make", data=f"{f}:data", init="dense")
    assert e.value.field == "init" and not (tmp_path / "r").exists()
    assert "(--optimizer adamw, --lam 0, --schedule cosine)" in e.value.render(lambda f: "--" + f)


def test_random_start_warns_unless_asked_for(tmp_path):
    assert "starting from random weights" in run(tmp_path / "a", lam=1e-3)
    res = cli("finetune", "--epochs", "1", "--lam", "1e-3", "--threads", "1", "--out", tmp_path / "cli", "-q")
    assert res.returncode == 0 and "Start from a trained model with --init dense" in res.stdout, res.stdout
    assert "starting from random weights" not in run(tmp_path / "b", lam=1e-3, init="random")
    assert "starting from random weights" not in run(tmp_path / "c", lam=0.0)  # dense training: nothing to remove
    assert json.loads((tmp_path / "b" / "config.json").read_text())["init"] == "random"


@pytest.mark.e2e
def test_report_calls_a_random_start_start(tmp_path):
    out = tmp_path / "r"
    res = cli("finetune", "--epochs", "1", "--lam", "1e-3", "--init", "random", "--threads", "1", "--out", out, "-q")
    assert res.returncode == 0, res.stderr
    assert cli("export", out).returncode == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["start"] == "random" and "start_accuracy" in rep and "dense_accuracy" not in rep
    shown = cli("inspect", out).stdout
    assert "start (random weights)" in shown and "start=random" in shown
