"""Latency measurements kept per machine, so measured decisions repeat.

The freeze keeps width alignment only where ONNX Runtime measures it faster. Timing differs from run
to run, so without a memory two identical commands could freeze different structures. The first
measurement of an (architecture, widths, setting) on this machine is stored under the cache folder
and every later run reads it: the same command and seed give the same run, and the decision is still
a measurement (delete the folder to measure again, e.g. after an ONNX Runtime upgrade).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

import torch

from compress.files import atomic_write_json, cache_dir
from compress.structure.tensors import flatten_tensors


def machine() -> dict:
    """What makes a latency specific to this machine."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__}


class MeasuredLatencies:
    """latency/dense ratios of one architecture and timing setting, keyed by the kept widths per layer."""

    def __init__(self, model: torch.nn.Module, example_inputs, setting: str):
        shapes = [(tuple(t.shape), str(t.dtype)) for t in flatten_tensors(example_inputs)]
        ident = json.dumps(
            {"model": str(model), "inputs": shapes, "setting": setting, "machine": machine()}, sort_keys=True
        )
        self.path = cache_dir() / "latency" / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"
        try:
            self.ratios = json.loads(self.path.read_text())["ratios"]
        except (OSError, ValueError, KeyError, TypeError):
            self.ratios = {}
        self.setting = setting

    @staticmethod
    def key(widths: dict) -> str:
        return json.dumps(sorted(widths.items()))

    def get(self, widths: dict) -> float | None:
        v = self.ratios.get(self.key(widths))
        return float(v) if isinstance(v, (int, float)) else None

    def put(self, widths: dict, ratio: float) -> None:
        self.ratios[self.key(widths)] = float(ratio)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"setting": self.setting, "machine": machine(), "ratios": self.ratios})
        except Exception:  # noqa: BLE001 - a read-only cache only costs a re-measurement next time
            pass
