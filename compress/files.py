"""Atomic file writes (temp file + rename): a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from compress.errors import UserError


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(
            f"cannot write to {path.parent}: {e.strerror}; check the directory exists and is writable"
        ) from e
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files follow the umask like any file
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _remove_stale_temps(path, keep=tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def cache_dir() -> Path:
    """Where compress keeps what it can reuse across runs (dense baselines, latency measurements):
    $COMPRESS_CACHE, else $XDG_CACHE_HOME/compress, else ~/.cache/compress."""
    if os.environ.get("COMPRESS_CACHE"):
        return Path(os.environ["COMPRESS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _remove_stale_temps(path: Path, keep: str) -> None:
    """Temp files of earlier writes to `path` that were killed (kill -9 cannot clean up after itself)."""
    for old in path.parent.glob(f".{path.name}.*.tmp"):
        if str(old) != keep:
            try:
                old.unlink()
            except OSError:
                pass


def atomic_write_bytes(path, data: bytes) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, w)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path, writer: Callable[[str], None]) -> None:
    """Atomic write for libraries that want a file name (safetensors, onnx, matplotlib)."""
    _atomic(path, writer)


def check_writable(path) -> Path:
    """Before long work (a benchmark, an export): `path` can be written — its folder exists and takes a new
    file — so the work is not lost to a typo in the output path at the end."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name, e.g. {path / 'bench.json'}")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; check the directory is writable") from e
    os.close(fd)
    os.unlink(tmp)
    return path


def sha256_of(path) -> str:
    """The file's sha256, to record which file a measurement was made on."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
