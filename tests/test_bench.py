"""Benchmark of two user-made ONNX files: what bench computes from the timings (statistics, speedup,
efficiency, interleaving, round sizing) against a fake clock and scripted sessions, so nothing depends on
how busy the machine is; real ORT runs give sane numbers; shape overrides reach the feed, results are JSON,
the chart is written, bad input is a UserError. Whether a smaller model is faster is a measurement
(examples/bench_latency.py), not a test."""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import compress.deploy.bench as bench
from compress.deploy.bench import benchmark, plot_bench, print_bench_table
from compress.errors import UserError

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*TorchScript-based ONNX export:DeprecationWarning", "ignore:The feature will be removed:DeprecationWarning"
)


def stack(width, depth=3, d_in=256, d_out=10):
    torch.manual_seed(width)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out)).eval()


def linear_flops(model, batch=1):
    """2 · in · out per Linear and sample: the textbook count, written out independently."""
    return sum(2 * batch * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def user_export(model, path, example, axes):
    """Exported the way a user would, straight with torch, not with compress.export."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": axes, "y": axes},
        opset_version=17,
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    big, small = stack(512), stack(64)  # 26× fewer FLOPs
    user_export(big, d / "big.onnx", torch.randn(2, 256), {0: "N"})
    user_export(small, d / "small.onnx", torch.randn(2, 256), {0: "N"})
    return d, big, small


def test_real_onnxruntime_numbers_are_sane(pair):
    d, big, small = pair
    r = benchmark(
        d / "big.onnx",
        d / "small.onnx",
        batch_sizes=(1, 16),
        threads=(1,),
        warmup=2,
        rounds=25,
        flops=(linear_flops(big), linear_flops(small)),
    )
    assert [(x["threads"], x["batch"]) for x in r["results"]] == [(1, 1), (1, 16)]
    for row in r["results"]:
        assert row["engine"] == "onnxruntime" and row["provider"] == "CPU"
        assert row["input_shapes"] == {"x": [row["batch"], 256]}
        for key in ("dense", "compressed"):
            s = row[key]
            assert s["n"] == 25 and 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"] < 1000
            assert s["spread"] >= 0
        assert row["speedup"] == pytest.approx(row["dense"]["median_ms"] / row["compressed"]["median_ms"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / r["flop_ratio"])
    assert r["flop_ratio"] == pytest.approx(linear_flops(big) / linear_flops(small))
    # parameters straight from the ONNX initializers
    assert r["dense"]["params_onnx"] == sum(p.numel() for p in big.parameters())
    assert r["compressed"]["params_onnx"] == sum(p.numel() for p in small.parameters())
    json.loads(json.dumps(r, allow_nan=False))


# --------------------------------------------------------------------------- what bench computes, deterministically


class FakeRuntime:
    """A clock that moves only when a scripted session runs: call k of model m at batch b costs
    UNIT[m] · b · (10 + k mod 7) ns, so every timing, and every statistic of it, is known in advance."""

    UNIT = {"big": 400, "small": 100}

    def __init__(self):
        self.ns, self.log, self.sessions = 0, [], []

    def perf_counter_ns(self):
        return self.ns

    def session(self, path, provider, threads, spinning):
        rt, name = self, Path(path).stem
        self.sessions.append((name, provider, threads, spinning))

        class Session:
            def run(self, outputs, feed):
                batch = feed["x"].shape[0]
                cost = rt.UNIT[name] * batch * (10 + len(rt.log) % 7)
                rt.ns += cost
                rt.log.append((name, threads, batch, cost))

        return Session()


@pytest.fixture
def fake(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter_ns=rt.perf_counter_ns))
    monkeypatch.setattr(bench, "_session", rt.session)
    return rt


def percentile(xs, q):
    """numpy's default ("linear") percentile, written out: interpolate between the two nearest ranks."""
    s = sorted(xs)
    pos = q / 100 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def hand_stats(ns):
    ms = [x / 1e6 for x in ns]
    med, q1, q3 = percentile(ms, 50), percentile(ms, 25), percentile(ms, 75)
    return {
        "median_ms": med,
        "p90_ms": percentile(ms, 90),
        "min_ms": min(ms),
        "mean_ms": sum(ms) / len(ms),
        "iqr_ms": q3 - q1,
        "spread": (q3 - q1) / med,
        "n": len(ms),
    }


def segments(log, warmup, rounds_of):
    """Split the session log per (threads, batch) row: one probe run each, warm-up pairs, timed rounds."""
    out, i = [], 0
    for key in dict.fromkeys((t, b) for _, t, b, _ in log):
        rounds = rounds_of(key)
        n = 2 + 2 * warmup + 2 * rounds
        seg = log[i : i + n]
        assert {(t, b) for _, t, b, _ in seg} == {key}
        out.append((key, seg[2 : 2 + 2 * warmup], seg[2 + 2 * warmup :]))
        i += n
    assert i == len(log)
    return out


def test_statistics_speedup_and_efficiency_from_a_fake_clock(pair, fake):
    d = pair[0]
    r = bench.benchmark(
        d / "big.onnx", d / "small.onnx", batch_sizes=(1, 16), threads=(1, 3), warmup=2, rounds=9, flops=(26, 2)
    )
    assert fake.sessions == [(m, "CPUExecutionProvider", t, False) for t in (1, 3) for m in ("big", "small")]
    assert r["flop_ratio"] == 13.0
    rows = {(x["threads"], x["batch"]): x for x in r["results"]}
    assert list(rows) == [(1, 1), (1, 16), (3, 1), (3, 16)]
    for key, warm, timed in segments(fake.log, 2, lambda _: 9):
        assert [m for m, *_ in warm] == ["big", "small"] * 2
        # interleaved A B, B A, A B, ...: both see the same drift
        assert [m for m, *_ in timed] == [
            m for k in range(9) for m in (("big", "small") if k % 2 == 0 else ("small", "big"))
        ]
        row = rows[key]
        for name, side in (("big", "dense"), ("small", "compressed")):
            want = hand_stats([c for m, _, _, c in timed if m == name])
            assert row[side] == pytest.approx(want, rel=1e-12), (key, side)
        assert row["speedup"] == pytest.approx(row["dense"]["median_ms"] / row["compressed"]["median_ms"], rel=1e-12)
        assert row["efficiency"] == pytest.approx(row["speedup"] / 13.0, rel=1e-12)
    # written out once more without the helpers: big's timed calls at batch 1 are log entries 6..23, rounds ABBA
    big = [400 * (10 + k % 7) for k in range(6, 24) if (k - 6) % 4 in (0, 3)]
    assert rows[(1, 1)]["dense"]["n"] == 9 and rows[(1, 1)]["dense"]["min_ms"] == min(big) / 1e6


def test_rounds_fill_the_time_budget_from_the_warm_up(pair, fake):
    """rounds=None: as many rounds as fit the budget at the warm-up's pace per pair, clamped to [10, 5000]."""
    d = pair[0]
    kw = dict(batch_sizes=(1, 4), threads=(1,), warmup=3, rounds=None)
    got = {}
    for budget_s in (2e-4, 1e-9, 10.0):
        fake.log.clear()
        r = bench.benchmark(d / "big.onnx", d / "small.onnx", time_budget_s=budget_s, **kw)
        ns = {x["batch"]: x["dense"]["n"] for x in r["results"]}
        # the warm-up of each row: 3 pairs right after the two probe runs
        want, i = {}, 0
        for b in (1, 4):
            pace = sum(c for *_, c in fake.log[i + 2 : i + 8]) / 3 / 1e9
            want[b] = int(min(5000, max(10, budget_s / pace)))
            i += 8 + 2 * want[b]
        assert ns == want and all(x["compressed"]["n"] == want[x["batch"]] for x in r["results"])
        assert i == len(fake.log)
        got[budget_s] = ns
    assert 10 < got[2e-4][1] < 5000  # neither clamp: the budget really sized it
    assert got[1e-9] == {1: 10, 4: 10} and got[10.0] == {1: 5000, 4: 5000}


def test_quick_means_one_warm_up_and_five_rounds(pair, fake):
    d = pair[0]
    r = bench.benchmark(d / "big.onnx", d / "small.onnx", batch_sizes=(2,), threads=(1,), quick=True)
    assert r["settings"]["warmup"] == 1 and r["settings"]["rounds"] == 5
    assert len(fake.log) == 2 + 2 + 10 and r["results"][0]["dense"]["n"] == 5


def test_torch_reference_params_and_flops(pair):
    d, big, small = pair
    r = benchmark(
        d / "big.onnx", d / "small.onnx", batch_sizes=(2,), threads=(1,), quick=True, torch_models=(big, small)
    )
    assert r["flops"]["dense"] == linear_flops(big) and r["flops"]["compressed"] == linear_flops(small)
    assert r["dense"]["params"] == sum(p.numel() for p in big.parameters())
    assert [(x["engine"], x["provider"]) for x in r["results"]] == [("onnxruntime", "CPU"), ("torch", "eager")]
    assert all(x["dense"]["n"] == 5 for x in r["results"])
    json.dumps(r)


def test_threads_none_means_all_cores(pair):
    d, _, _ = pair
    r = benchmark(d / "big.onnx", d / "small.onnx", batch_sizes=(1,), threads=(None,), quick=True)
    assert r["results"][0]["threads"] == bench.all_cores() == r["machine"]["cores"]


def test_input_shape_defaults_and_overrides(tmp_path, monkeypatch):
    m = stack(32, depth=1, d_in=8)
    for name in ("a", "b"):
        user_export(m, tmp_path / f"{name}.onnx", torch.randn(2, 3, 8), {0: "N", 1: "seq"})
    fed = []
    real = bench.make_feed
    monkeypatch.setattr(bench, "make_feed", lambda *a, **k: fed.append(real(*a, **k)) or fed[-1])

    def shapes(**kw):
        fed.clear()
        r = benchmark(tmp_path / "a.onnx", tmp_path / "b.onnx", batch_sizes=(2,), threads=(1,), quick=True, **kw)
        assert {f["x"].shape for f in fed} == {tuple(r["results"][0]["input_shapes"]["x"])}
        return fed[0]["x"].shape

    assert shapes() == (2, 128, 8)  # dynamic non-batch dims default to seq_len = 128
    assert shapes(seq_len=9) == (2, 9, 8)
    assert shapes(input_shapes={"seq": 5}) == (2, 5, 8)  # by symbolic dim name
    assert shapes(input_shapes={"x": [None, 4, 8]}) == (2, 4, 8)  # by input, None = batch
    assert shapes(input_shapes={"x": [3, 6, 8]}) == (3, 6, 8)  # fully fixed
    with pytest.raises(UserError, match="rank"):
        shapes(input_shapes={"x": [None, 8]})
    with pytest.raises(UserError, match="neither an input"):
        shapes(input_shapes={"y": [1, 2]})


def test_text_inputs_get_valid_ids_and_ones_mask():
    inputs = [
        ("input_ids", ["batch", "seq"], np.dtype(np.int64)),
        ("attention_mask", ["batch", "seq"], np.dtype(np.int64)),
        ("pixel", ["batch", 3], np.dtype(np.float32)),
    ]
    feed = bench.make_feed(inputs, bench.resolve_shapes(inputs, 4, 16, None))
    assert feed["input_ids"].shape == (4, 16) and feed["input_ids"].dtype == np.int64
    assert set(np.unique(feed["input_ids"])) <= {0, 1}
    assert (feed["attention_mask"] == 1).all() and feed["pixel"].shape == (4, 3)


def test_table_and_png(pair, tmp_path):
    d, _, _ = pair
    r = benchmark(d / "big.onnx", d / "small.onnx", batch_sizes=(1, 4), threads=(1,), quick=True, flops=(8, 1))
    con = Console(record=True, width=160)
    print_bench_table(r, con)
    text = con.export_text()
    assert f"{r['results'][1]['speedup']:.2f}×" in text and "8.00×" in text
    png = tmp_path / "bench.png"
    plot_bench(r, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["bench.png"]


def test_bad_inputs(pair, tmp_path):
    d, _, _ = pair
    with pytest.raises(UserError, match="does not exist"):
        benchmark(tmp_path / "nope.onnx", d / "small.onnx", quick=True)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(UserError, match="junk.onnx"):
        benchmark(d / "big.onnx", junk, quick=True)
    other = tmp_path / "other.onnx"
    torch.onnx.export(stack(8), (torch.randn(2, 256),), str(other), dynamo=False, input_names=["pixels"])
    with pytest.raises(UserError, match="inputs differ"):
        benchmark(d / "big.onnx", other, quick=True)
