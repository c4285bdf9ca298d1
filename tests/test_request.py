"""A finetune request is built, resolved and validated once in the library; its errors name fields,
which the CLI shows as flags; the run directory is checked and prepared in one place (compress.runs)."""

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from compress.errors import UserError
from compress.request import FinetuneOptions, build_request, finetune_from
from compress.runs import RUN_FILES, check_out_dir, prepare_run_dir, read_config, read_metrics


def test_toml_under_options_resolved_once(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 30\nlam = 5e-3\nbatch-size = 128\nmodel = "mymod:factory"\n')
    req = build_request(FinetuneOptions(out=tmp_path / "r", lam=2e-3), config_file=toml)
    t = req.train
    assert (t.epochs, t.lam, t.batch_size, t.lr, t.milestones) == (30, 2e-3, 128, 3e-4, [15, 22])
    assert req.model == "mymod:factory" and req.budget is None and req.out == tmp_path / "r"
    assert not (tmp_path / "r").exists()  # building a request creates nothing


def test_budget_request_gets_one_decay_at_the_freeze(tmp_path):
    req = build_request(FinetuneOptions(out=tmp_path / "r", epochs=4, target_flops=0.5, align=8))
    assert req.train.milestones == [3] and req.train.lam == 1.5e-2
    assert req.budget.flops == 0.5 and req.controller == {"align": 8}
    req = build_request(FinetuneOptions(out=tmp_path / "r", epochs=4, target_flops=0.5, freeze_epoch=1, rewind="init"))
    assert req.controller == {"rewind": "init", "controller": {"freeze_epoch": 1}}


@pytest.mark.parametrize(
    "kw, field, text",
    [
        (dict(target_flops=1.5), "target_flops", "target_flops must be a fraction"),
        (dict(target_latency_ms=2.0, bench_batch=0), "bench_batch", "bench_batch must be a positive integer"),
        (
            dict(target_flops=0.5, bench_threads=2),
            "bench_threads",
            "only apply to a latency target (target_latency_ms)",
        ),
        (dict(bench_batch=4), "bench_batch", "only apply to target_latency_ms"),
        (dict(target_flops=0.5, lam=0.01), "lam", "give either lam or a target"),
        (dict(rewind="init"), "rewind", "rewind applies to target runs only"),
        (dict(final_lr=1e-4), "final_lr", "final_lr applies to target runs only"),
        (dict(target_flops=0.5, final_lr=0.0), "final_lr", "final_lr must be positive"),
        (dict(freeze_epoch=1), "freeze_epoch", "freeze_epoch applies to target runs only"),
        (dict(target_flops=0.5, epochs=4, freeze_epoch=5), "freeze_epoch", "freeze_epoch must be an epoch in 1..4"),
        (dict(epochs=0), "epochs", "epochs must be positive"),
        (dict(milestones="1,x"), "milestones", "milestones must be comma-separated"),
        (dict(input_shape="1,-3"), "input_shape", "input_shape must be positive integers"),
        (dict(epochs="3"), "epochs", "epochs must be int, got '3'"),
        (dict(device="tpu"), "device", "device must be auto, cpu or cuda"),  # before the model is built
    ],
)
def test_errors_name_the_field(tmp_path, kw, field, text):
    with pytest.raises(UserError) as e:
        build_request(FinetuneOptions(out=tmp_path / "r", **kw))
    assert e.value.field == field and text in str(e.value) and "--" not in str(e.value), str(e.value)


def test_toml_values_are_type_checked(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = "three"\n')
    with pytest.raises(UserError, match="epochs must be int, got 'three'"):
        build_request(FinetuneOptions(out=tmp_path / "r"), config_file=toml)


def test_cli_renders_fields_as_flags():
    from compress.cli.main import flag_of

    e = UserError("`flops` must be a fraction", field="flops").renamed({"flops": "target_flops"})
    assert e.field == "target_flops" and str(e) == "target_flops must be a fraction"
    assert e.render(flag_of) == "--target-flops must be a fraction"
    e = UserError("give either `lam` or a target (`target_latency_ms`)", field="lam", fields=("target_latency_ms",))
    assert e.render(flag_of) == "give either --lam or a target (--target-latency-ms)"
    assert flag_of("latency_ms") == "--target-latency-ms" and flag_of("batch_size") == "--batch-size"


def test_cli_passes_every_option():
    """The CLI's signature is the options plus what only a command line has; no option is dropped."""
    from compress.cli.main import finetune

    params = set(inspect.signature(finetune).parameters) - {"config", "resume", "force", "quiet"}
    assert params == {f.name for f in dataclasses.fields(FinetuneOptions)}


def test_resume_refuses_other_options_before_reading_anything(tmp_path):
    with pytest.raises(UserError) as e:
        finetune_from(FinetuneOptions(lam=5.0), resume=tmp_path / "missing")
    assert e.value.field == "lam" and "only lr" in str(e.value)
    with pytest.raises(UserError, match="not a run directory"):
        finetune_from(FinetuneOptions(lr=1e-4), resume=tmp_path)


def test_run_dir_checked_and_forced_in_one_place(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("mine.txt", RUN_FILES["config"], RUN_FILES["budget_state"], RUN_FILES["model_onnx"]):
        (out / name).write_text("{}")
    with pytest.raises(UserError) as e:
        check_out_dir(out, force=False)
    assert e.value.field == "force"
    prepare_run_dir(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    with pytest.raises(UserError, match="not a run directory"):
        read_config(out)
    (out / RUN_FILES["config"]).write_text(json.dumps({"train": {}, "model": "m"}))
    (out / RUN_FILES["metrics"]).write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert read_config(out)["model"] == "m" and [m["epoch"] for m in read_metrics(out)] == [1, 2]
    with pytest.raises(UserError, match="does not exist"):
        read_config(Path(tmp_path / "nope"))


def test_pretrained_hf_budget_run_rewinds_to_the_pretrained_weights_by_default(tmp_path):
    """hf: starts are trained models: their budget runs choose the structure early and retrain it from the
    pretrained weights at the run's lr; what the user states wins; other models keep the general defaults."""
    req = build_request(FinetuneOptions(out=tmp_path / "a", model="hf:/m", target_flops=0.5, lr=1e-4))
    assert req.controller == {"rewind": "init", "final_lr": 1e-4}
    req = build_request(FinetuneOptions(out=tmp_path / "b", model="hf:/m", target_flops=0.5, rewind="none"))
    assert req.controller["rewind"] == "none"
    req = build_request(FinetuneOptions(out=tmp_path / "c", model="hf:/m", target_flops=0.5, final_optimizer="same"))
    assert "rewind" not in req.controller
    req = build_request(FinetuneOptions(out=tmp_path / "d", model="digits-resnet", target_flops=0.5))
    assert req.controller == {}
    from compress.budget.settings import default_freeze_epoch
    from compress.train.config import TrainConfig

    cfg = TrainConfig(epochs=30, milestones=[22])
    assert default_freeze_epoch(cfg) == 22 and default_freeze_epoch(cfg, "init") == 8
    assert default_freeze_epoch(TrainConfig(epochs=4, milestones=[3]), "init") == 1
