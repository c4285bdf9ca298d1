"""A compressed model survives save → load into a fresh dense instance, with identical outputs."""

import pytest
import torch

from compress.deploy.extract import extract
from compress.deploy.saving import load_compressed, save_compressed
from compress.errors import UserError
from compress.models import get_model
from compress.structure.find import find_groups


@pytest.mark.parametrize("name", ["digits-resnet", "mobilenetv2", "vit-tiny"])
def test_round_trip(tmp_path, name):
    spec = get_model(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    groups = find_groups(model, spec.example_input(1))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in torch.randperm(len(groups), generator=gen)[: len(groups) // 2].tolist():
            g = groups[i]
            for s, t in zip(g.slices, g.tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
    small, _ = extract(model, groups, spec.example_input(1))
    save_compressed(small, tmp_path / "c.safetensors")
    fresh = load_compressed(spec.build(), tmp_path / "c.safetensors").eval()
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in small.parameters())
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in model.parameters())
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*args), small(*args), rtol=0, atol=0)


def test_wrong_model_is_a_clear_error(tmp_path):
    save_compressed(torch.nn.Sequential(torch.nn.Linear(3, 2)), tmp_path / "c.safetensors")
    with pytest.raises(UserError, match="does not match"):
        load_compressed(
            torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(3, 2)), tmp_path / "c.safetensors"
        )
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a compressed model"):
        load_compressed(torch.nn.Linear(3, 2), tmp_path / "bad.safetensors")
