"""Opt-in zoo (pytest -m zoo; pip install -e .[zoo]): every real architecture compresses exactly.

For each model: find_groups, then zero every second group of every layer (so each kind of
group of each layer is exercised), extract (which compares dense and compressed outputs and
raises on a mismatch), compare again here, export to ONNX and check ONNX Runtime agrees.
"""

import pytest
import torch

pytest.importorskip("torchvision", reason="zoo extra not installed (pip install -e .[zoo])")
pytest.importorskip("timm", reason="zoo extra not installed (pip install -e .[zoo])")
pytest.importorskip("transformers", reason="zoo extra not installed (pip install -e .[zoo])")

from zoo_models import MODELS, build

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_model_compresses_exactly(name, tmp_path):
    import compress
    from compress.structure.tensors import flatten_tensors

    sys_path_examples = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"
    import sys

    sys.path.insert(0, str(sys_path_examples))
    from zoo import zero_half

    model, x = build(name)
    groups = compress.find_groups(model, x)
    assert all(reason for _, reason in groups.not_prunable)
    if not len(groups):
        pytest.skip(f"{name}: nothing prunable: {groups.not_prunable[-1][1]}")
    assert zero_half(groups) > 0
    small, rep = compress.extract(model, groups, x)
    with torch.no_grad():
        ref, got = flatten_tensors(model(x)), flatten_tensors(small(x))
    scale = max(float(t.abs().max()) for t in ref)
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) <= 1e-5 * max(scale, 1.0)
    assert rep["params_after"] < rep["params_before"]
    compress.export_onnx(small, x, tmp_path / "m.onnx")
