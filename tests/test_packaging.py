"""The wheel a user installs: one top-level package (`compress`, the cli/ folder inside it as compress.cli),
the `compress` command, and a distribution name of its own (`compress` on the index is another project).
Built offline with setuptools' PEP 517 backend from a copy of the tree, so the checkout stays clean."""

import configparser
import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("compress", "cli"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    res = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    path = out / res.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(path) as z:
        return path.name, z.namelist(), {n: z.read(n).decode() for n in z.namelist() if ".dist-info/" in n}


def _dist_info(meta, leaf):
    (name,) = [n for n in meta if n.endswith(".dist-info/" + leaf)]
    return meta[name]


def test_only_compress_is_installed_at_the_top_level(wheel):
    _, names, _ = wheel
    top = {n.split("/")[0] for n in names}
    assert top == {"compress", "compress_ramda-0.1.0.dist-info"}, top


def test_every_source_module_is_in_the_wheel(wheel):
    """pyproject lists the packages by hand: a new folder under compress/ must not be left out of the wheel."""
    _, names, _ = wheel
    expected = {"compress/" + p.relative_to(ROOT / "compress").as_posix() for p in (ROOT / "compress").rglob("*.py")}
    expected |= {"compress/cli/" + p.relative_to(ROOT / "cli").as_posix() for p in (ROOT / "cli").rglob("*.py")}
    assert expected - set(names) == set()
    assert "compress/cli/main.py" in names and "compress/cli/__init__.py" in names


def test_console_script_and_distribution_name(wheel):
    filename, _, meta = wheel
    assert filename.startswith("compress_ramda-0.1.0-")
    entry = configparser.ConfigParser()
    entry.read_string(_dist_info(meta, "entry_points.txt"))
    assert dict(entry["console_scripts"]) == {"compress": "compress.cli.main:app"}
    msg = email.parser.Parser().parsestr(_dist_info(meta, "METADATA"))
    assert msg["Name"] == "compress-ramda" and msg["Version"] == "0.1.0"
