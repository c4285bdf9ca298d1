"""Data-parallel fine-tuning: 2 processes (gloo) equal one process with the same global batch."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e  # two processes under torchrun, finetune end to end

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from compress.train.config import TrainConfig
    from compress.train.loop import finetune
    sys.path.insert(0, sys.argv[2])
    from ddp_common import build, data

    out = sys.argv[1]
    cfg = TrainConfig(epochs=2, lr=0.02, lam=3e-3, milestones=[1], batch_size=32, device="cpu")
    res = finetune(build(), *data(), torch.rand(1, 64), out + "/run", cfg, progress=False)
    rank = dist.get_rank()
    opt = res.optimizer
    state = {f"{i}/{k}": v for i, p in enumerate(opt.param_groups[0]["params"])
             for k, v in opt.state[p].items() if torch.is_tensor(v)}
    state.update({f"w/{k}": v for k, v in res.model.state_dict().items()})
    torch.save(state, f"{out}/rank{rank}.pt")
""")

COMMON = textwrap.dedent("""
    import torch
    from compress.models.digits import digits_datasets

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                   torch.nn.Linear(48, 10))

    def data():
        tr, te = digits_datasets()
        ds = torch.utils.data.TensorDataset
        return ds(tr.tensors[0][:320].flatten(1), tr.tensors[1][:320]), ds(te.tensors[0][:64].flatten(1), te.tensors[1][:64])
""")


def test_two_gloo_processes_match_one_process(tmp_path):
    (tmp_path / "ddp_common.py").write_text(COMMON)
    (tmp_path / "ddp_run.py").write_text(SCRIPT)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(tmp_path / "ddp_run.py"),
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.endswith("/w_hat") for k in r0)
    for k in r0:  # every rank holds the same optimizer state (V, U, W0, Ŵ, ...) and weights
        assert torch.equal(r0[k], r1[k]), k

    sys.path.insert(0, str(tmp_path))
    try:
        from ddp_common import build, data
    finally:
        sys.path.pop(0)
    from compress.train.config import TrainConfig
    from compress.train.loop import finetune

    cfg = TrainConfig(epochs=2, lr=0.02, lam=3e-3, milestones=[1], batch_size=32, device="cpu")
    single = finetune(build(), *data(), torch.rand(1, 64), tmp_path / "single", cfg, progress=False)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, r0[f"w/{k}"], atol=1e-5, rtol=0), (k, (v - r0[f"w/{k}"]).abs().max())
    assert (tmp_path / "run" / "weights.safetensors").is_file()  # rank 0 wrote the run
