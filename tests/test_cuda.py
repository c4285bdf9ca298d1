"""The CUDA path: runs where a GPU is present, skipped with a reason elsewhere."""

import pytest
import torch

from compress.models.digits import DigitsResNet
from compress.optim import RAMDA
from compress.structure.find import find_groups

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)


def test_ramda_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = DigitsResNet(channels=8).double()
    gpu = DigitsResNet(channels=8).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    opts = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        groups = find_groups(m, x[:1].to(dev))
        opts.append(RAMDA(m.parameters(), lr=1e-2, lam=1e-2, groups=groups))
    for _ in range(10):
        for m, opt, dev in ((cpu, opts[0], "cpu"), (gpu, opts[1], "cuda")):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for (k, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-9, atol=1e-9, msg=k)
    assert opts[0].group_sparsity() == opts[1].group_sparsity()


def test_finetune_on_cuda_with_bf16_autocast(tmp_path, digits_small):
    from compress.train.config import TrainConfig
    from compress.train.loop import finetune

    cfg = TrainConfig(epochs=2, lr=1e-3, lam=1e-2, device="cuda", amp="bf16")
    res = finetune(DigitsResNet(channels=8), *digits_small, torch.rand(1, 1, 8, 8), tmp_path / "r", cfg, progress=False)
    assert next(res.model.parameters()).is_cuda
    assert all(
        v.dtype == torch.float32
        for st in res.optimizer.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.is_floating_point()
    )
    assert res.metrics[-1]["accuracy"] > 0.2
