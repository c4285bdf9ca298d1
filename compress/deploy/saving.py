"""Save and load a compressed (extracted) model without pickling code.

An extracted model has the dense model's classes with smaller shapes. The file holds the
state_dict (safetensors) and, as JSON metadata, each module's public scalar attributes
(in/out channels, num_features, num_heads, head_dim, ...). Loading rebuilds the dense
model from its own factory, re-applies those attributes and parameter shapes, then loads
the weights — so the pruned architecture is rebuilt from the user's code, never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from compress.errors import UserError

_SCALARS = (int, float, bool, str, type(None))


def _jsonable(v) -> bool:
    if isinstance(v, _SCALARS):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, _SCALARS) for x in v)


def module_attributes(model: torch.nn.Module) -> dict[str, dict]:
    """Public plain-data attributes of every module (what shapes the architecture)."""
    out = {}
    for name, mod in model.named_modules():
        attrs = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(mod).items()
            if not k.startswith("_") and k != "training" and _jsonable(v)
        }
        if attrs:
            out[name] = attrs
    return out


def save_compressed(model: torch.nn.Module, path: str | Path, info: dict | None = None) -> None:
    """Write the compressed model's weights and architecture attributes to one safetensors file."""
    from compress.train.checkpoint import write_tensors

    meta = {
        "format": "compress.compressed/1",
        "attributes": json.dumps(module_attributes(model)),
        "info": json.dumps(info or {}),
    }
    write_tensors(path, model.state_dict(), meta)


def load_compressed(model: torch.nn.Module | str | Path, path: str | Path | None = None) -> torch.nn.Module:
    """Shrink `model` (a fresh dense instance from the same factory) to the saved shapes and load the weights.

    `load_compressed(RUN)`: a run directory after `compress export` — the dense model is rebuilt from
    the run's own model spec (a built-in name, module:factory or hf:PATH) and RUN/compressed.safetensors
    shrinks it, so a pruned Hugging Face encoder comes back with its per-layer head counts and
    intermediate sizes, without unpickling anything."""
    if path is None:
        return _load_run_compressed(Path(model))
    path = Path(path)
    if not path.is_file():
        raise UserError(f"compressed model {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        attrs = json.loads(meta["attributes"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is not a compressed model written by compress ({e})") from e
    modules = dict(model.named_modules())
    for name, saved in attrs.items():
        mod = modules.get(name)
        if mod is None:
            raise UserError(f"{path} does not match the model: it has a module {name!r} the model lacks")
        for k, v in saved.items():
            cur = getattr(mod, k, None)
            v = tuple(v) if isinstance(cur, tuple) else v
            if cur != v:
                try:
                    setattr(mod, k, v)
                except AttributeError:
                    pass
    from compress.structure import no_heads, shared_bias, window_attention

    shared_bias.reinstall(model)  # T5-style blocks that lost heads read only their rows of the shared bias
    window_attention.reinstall(model)  # torchvision Swin/MaxViT blocks with an explicit head size
    no_heads.reinstall(model)  # attention blocks removed whole return their out projection's bias
    own = model.state_dict()
    for key, t in sd.items():
        if key not in own:
            raise UserError(f"{path} does not match the model: {key!r} is not a parameter or buffer of it")
        if own[key].shape != t.shape:
            mod_name, _, leaf = key.rpartition(".")
            mod = modules[mod_name]
            if leaf in mod._parameters:
                mod._parameters[leaf] = torch.nn.Parameter(torch.empty_like(t), requires_grad=own[key].requires_grad)
            else:
                mod._buffers[leaf] = torch.empty_like(t)
    from compress.train.checkpoint import load_into

    load_into(model, sd, str(path))
    return model


def _load_run_compressed(run: Path) -> torch.nn.Module:
    from compress.runs import run_config

    config = run_config(run)
    path = run / "compressed.safetensors"
    if not path.is_file():
        raise UserError(f"{run} has no compressed.safetensors; run `compress export {run}` first")
    from compress.models.userspec import parse_input_shape, resolve_model

    spec = resolve_model(config["model"], parse_input_shape(config.get("input_shape")))
    return load_compressed(spec.build(), path).eval()
