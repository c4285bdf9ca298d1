"""Your own model and training loop, compressed with the Python API.

    python examples/custom_model.py [--quick] [--out runs/custom]

A small CNN defined here (not a built-in) is trained densely, then fine-tuned with
`compress.RAMDA` inside a plain PyTorch loop, extracted, exported to ONNX, verified and
benchmarked — the steps `compress finetune/export/bench` run for built-in models.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import compress
from compress.models.digits import digits_datasets
from compress.train.evaluate import recalibrate_batchnorm


class SmallNet(nn.Module):
    """conv-BN-ReLU ×2 → pool → an MLP head; the last Linear's outputs are never pruned."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, 48, 3, padding=1),
            nn.BatchNorm2d(48),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(48 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, data, opt, epochs, milestones=(), on_restart=None):
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for epoch in range(epochs):
        if epoch in milestones:
            for g in opt.param_groups:
                g["lr"] *= 0.1
            if on_restart:
                on_restart()
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few epochs, for tests")
    ap.add_argument("--out", type=Path, default=Path("runs/custom"))
    ap.add_argument("--lam", type=float, default=2e-2)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train_ds, test_ds = digits_datasets()
    example = torch.rand(1, 1, 8, 8)
    dense_epochs, sparse_epochs = (2, 3) if args.quick else (15, 20)

    model = SmallNet()
    train(model, train_ds, torch.optim.AdamW(model.parameters(), lr=3e-3), dense_epochs)
    dense = SmallNet()
    dense.load_state_dict(model.state_dict())
    print(f"dense accuracy {accuracy(dense, test_ds):.4f}")

    # 1. groups: removable structures, found with torch-pruning's dependency graph
    groups = compress.find_groups(model, example)
    print(f"{len(groups)} removable groups; not prunable: {groups.not_prunable}")

    # 2. group-lasso fine-tuning with RAMDA in our own loop (restart at each lr decay)
    opt = compress.RAMDA(model.parameters(), lr=3e-4, lam=args.lam, groups=groups)
    m = sparse_epochs
    train(model, train_ds, opt, m, milestones=(m // 2, 3 * m // 4), on_restart=opt.restart)
    opt.commit_structured_point()  # Ŵ, the structured point, becomes the weights
    recalibrate_batchnorm(model, train_ds, torch.device("cpu"))
    zero, weighted = opt.group_sparsity()
    print(f"fine-tuned accuracy {accuracy(model, test_ds):.4f}, {zero:.1%} of groups exactly zero")

    # 3. extract, save/load, export + verify, benchmark
    small, info = compress.extract(model, groups, example)
    print(f"params {info['params_before']:,} → {info['params_after']:,}; max |Δ| {info['max_abs_diff']:.1e}")
    compress.save_compressed(small, args.out / "compressed.safetensors")
    reloaded = compress.load_compressed(SmallNet(), args.out / "compressed.safetensors")
    print(f"compressed accuracy {accuracy(reloaded, test_ds):.4f} (reloaded from safetensors)")
    d = compress.export_onnx(dense.eval(), example, args.out / "dense.onnx", eval_data=test_ds)
    c = compress.export_onnx(small, example, args.out / "model.onnx", eval_data=test_ds)
    print(
        f"ONNX accuracy dense {d['onnx_accuracy']:.4f}, compressed {c['onnx_accuracy']:.4f}; "
        f"max |ORT − torch| {c['max_abs_diff']:.1e}"
    )
    result = compress.benchmark(
        args.out / "dense.onnx", args.out / "model.onnx", batch_sizes=(1, 32), threads=(1,), quick=args.quick
    )
    from compress.deploy.bench import print_bench_table

    print_bench_table(result)


if __name__ == "__main__":
    main()
