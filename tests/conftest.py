import os

import pytest
import torch

os.environ.setdefault("COMPRESS_QUIET_EXPORT", "1")
# One thread: the suite runs beside other processes, and OpenMP spinning under load makes
# multi-threaded small-tensor kernels 10x slower (measured: 134 vs 1240 ms per digits step).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:  # torchvision's C++ ops do not load on this CPU torch: define its op schemas first
    from zoo_models import register_torchvision_ops

    register_torchvision_ops()
except ImportError:
    pass


@pytest.fixture
def digits_small():
    """A 300/100 subset of the digits split: fast enough for loops in tests."""
    from compress.models.digits import digits_datasets

    tr, te = digits_datasets()
    sub = torch.utils.data.TensorDataset
    return sub(*(t[:300] for t in tr.tensors)), sub(*(t[:100] for t in te.tensors))
