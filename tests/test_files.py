"""Run files follow the user's umask, and `module:factory` resolves against the current folder."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from compress.files import atomic_write_text


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_module_factory_resolves_from_current_folder(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent("""
        import torch
        def make_net():
            return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    """)
    )
    # a console script's sys.path does not hold the current folder; -I mimics that
    code = (
        "import sys; from compress.models.userspec import resolve_model; "
        "print(type(resolve_model('mymodels:make_net').build()).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Sequential"
