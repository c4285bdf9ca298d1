import os

import pytest
import torch

os.environ.setdefault("COMPRESS_QUIET_EXPORT", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def digits_small():
    """A 300/100 subset of the digits split: fast enough for loops in tests."""
    from compress.models.digits import digits_datasets

    tr, te = digits_datasets()
    sub = torch.utils.data.TensorDataset
    return sub(*(t[:300] for t in tr.tensors)), sub(*(t[:100] for t in te.tensors))
