"""Checkpoints that are safe to load and never torn.

One safetensors file holds every tensor (model weights, optimizer state, RNG states);
its string metadata holds the JSON of everything else (optimizer scalars, param groups,
schedule position). Loading never unpickles code, and the file is written atomically,
so `kill -9` during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from compress.errors import UserError
from compress.files import atomic_write_with

_MODEL = "model/"
_OPT = "optim/"
_RNG = "rng/"


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{_OPT}{idx}/{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}/{key}"] = val
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, key = name[len(_OPT) :].split("/", 1)
        state.setdefault(int(idx), {})[key] = t
    for name, val in meta["scalars"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: dict,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model weights, optimizer state, RNG states and `info` (JSON) to one file, atomically."""
    tensors = {f"{_MODEL}{k}": v for k, v in model.state_dict().items()}
    opt_meta = None
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    for k, v in (rng or {}).items():
        tensors[f"{_RNG}{k}"] = v
    write_tensors(path, tensors, {"info": json.dumps(info), "optimizer": json.dumps(opt_meta)})


def load_checkpoint(path) -> dict:
    """Read a checkpoint into {"model": state_dict, "optimizer": state_dict|None, "rng": {...}, "info": {...}}.

    A truncated or corrupted file raises UserError, never a traceback from deep inside a library.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta["info"])
        opt_meta = json.loads(meta["optimizer"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(
            f"checkpoint {path} is corrupted or truncated ({e}); resume from an earlier run or start again"
        ) from e
    model = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    rng = {k[len(_RNG) :]: v for k, v in tensors.items() if k.startswith(_RNG)}
    opt = None
    if opt_meta is not None:
        opt = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith(_OPT)}, opt_meta)
    return {"model": model, "optimizer": opt, "rng": rng, "info": info}


def load_weights(path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file, a checkpoint, or a state_dict saved with torch.save.

    torch.save files are read with weights_only=True: a file that would need to unpickle
    code is refused with a message instead of being executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"weights file {path} is corrupted or truncated ({e})") from e
        if any(k.startswith(_MODEL) for k in sd):  # a checkpoint: take its model part
            sd = {k[len(_MODEL) :]: v for k, v in sd.items() if k.startswith(_MODEL)}
        return sd
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; our message suffices
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unsafe or broken pickles
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(
                f"{path} is a pickle that would run code when loaded; refusing it. "
                "Save a plain state_dict (torch.save(model.state_dict(), ...)) or safetensors"
            ) from e
        raise UserError(f"cannot read weights from {path}: {msg}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line error naming the first mismatching parameter."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        kind = "missing from" if missing else "unexpected in"
        raise UserError(
            f"{source} does not match the model: parameter {first!r} is {kind} the file "
            f"({len(missing)} missing, {len(unexpected)} unexpected); was it saved from another model?"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(
                f"{source} does not match the model: {k!r} has shape {tuple(state[k].shape)} "
                f"in the file but {tuple(v.shape)} in the model"
            )
    model.load_state_dict(state)


def rng_state() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            st[f"cuda{i}"] = s
    return st


def set_rng_state(st: dict[str, torch.Tensor]) -> None:
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    cuda = [st[k] for k in sorted(st) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_weights(path, model: torch.nn.Module) -> None:
    """The model's state_dict as safetensors, atomically."""
    write_tensors(path, model.state_dict())


def write_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The one writer of tensor files (weights, checkpoints, compressed models): CPU copies, written to a
    temp file that is then renamed over `path`, so a crash never leaves a torn file."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    def write(tmp):
        save_file(sd, tmp, metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)

    atomic_write_with(path, write)


def _sort_metadata(path) -> None:
    """safetensors writes its metadata in hash-map order, which changes from process to process: sort it,
    so the same run writes the same bytes (the header is JSON; tensor offsets count from its end)."""
    import struct

    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + n :])
