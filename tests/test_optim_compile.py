"""The torch.compile'd kernels compute what the eager ones do (slow: compiling takes a while)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from compress.optim import make_optimizer
from compress.optim.base import compile_available
from compress.optim.ramda import _cbrt_bits_newton

pytestmark = pytest.mark.skipif(not compile_available(torch.device("cpu")), reason="torch.compile needs a C++ compiler")


def test_bits_newton_cube_root_accuracy():
    for dt, bound in ((torch.float32, 2.5 * 2.0**-23), (torch.float64, 1e-13)):
        lo, hi = (-37, 37) if dt == torch.float32 else (-300, 300)
        x = torch.logspace(lo, hi, 100001, dtype=torch.float64).to(dt)
        ref = x.double().pow(1.0 / 3.0)
        err = ((_cbrt_bits_newton(x).double() - ref) / ref).abs().max()
        assert float(err) <= bound, dt
        assert float(_cbrt_bits_newton(torch.zeros(2, dtype=dt)).abs().max()) == 0.0


def _model():
    torch.manual_seed(0)
    # both convs are large enough (>= COMPILE_MIN_TENSOR) to run compiled; BN and the head run eagerly
    return torch.nn.Sequential(
        torch.nn.Conv2d(8, 512, 3),
        torch.nn.BatchNorm2d(512),
        torch.nn.ReLU(),
        torch.nn.Conv2d(512, 16, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 16, 10),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ramda", "proxadam", "proxsgd", "rmda"])
def test_compiled_steps_match_eager(name):
    lr = {"ramda": 1e-2, "proxadam": 1e-3, "proxsgd": 5e-2, "rmda": 5e-2}[name]
    lam = {"ramda": 0.06, "proxadam": 0.1, "proxsgd": 0.1, "rmda": 0.1}[name]  # some groups zero, not all
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = make_optimizer(name, m1.parameters(), lr=lr, lam=lam, compile=True)
    o2 = make_optimizer(name, m2.parameters(), lr=lr, lam=lam, compile=False)
    # the same gradient sequence for both (recomputing them would let rounding differences grow)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        if step == 6 and hasattr(o1, "restart"):
            o1.restart()
            o2.restart()
        for p, q in zip(m1.parameters(), m2.parameters()):
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
            q.grad = p.grad.clone()
        o1.step()
        o2.step()
    assert o1.compiled, "compile fell back to eager"
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    n1, n2 = o1.group_norms(), o2.group_norms()
    assert torch.equal(n1 == 0, n2 == 0) and bool((n1 == 0).any()) and bool((n1 > 0).any())
    assert torch.allclose(n1, n2, rtol=1e-5, atol=1e-7)
    # resume through state_dict is bit-exact on the compiled path too
    buf = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    m3 = _model()
    m3.load_state_dict(saved["m"])
    o3 = make_optimizer(name, m3.parameters(), lr=lr, lam=lam, compile=True)
    o3.load_state_dict(saved["o"])
    x = torch.randn(16, 8, 8, 8)
    y = torch.randint(0, 10, (16,))
    for m, o in ((m1, o1), (m3, o3)):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
