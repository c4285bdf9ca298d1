"""Small stand-ins for library layers the tests need without the library installed."""

import torch
from torch import nn


class Conv1D(nn.Module):
    """GPT-2's Conv1D layout (transformers): y = x·W + b, W stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) * 0.3), nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)
