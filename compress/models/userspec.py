"""Turn the user's model / data strings into a model factory and data sets.

Accepted forms: a built-in name (`digits-resnet`), `package.module:factory`, or
`path/to/file.py:factory`. Every failure is a UserError that says what to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from compress.errors import UserError
from compress.models import ModelSpec, get_model


def _import_from_cwd(name: str):
    """`mymodels:make_net` resolves against the current folder, as `python -m` does (the console
    script's sys.path holds only its own bin/ folder)."""
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(name)


def _load_callable(spec: str, what: str):
    if ":" not in spec:
        raise UserError(
            f"`{what}` {spec!r} is neither a built-in name nor of the form module:function or file.py:function",
            field=what,
        )
    mod_name, func_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UserError(f"`{what}` file {path} does not exist", field=what)
            module_spec = importlib.util.spec_from_file_location(f"compress_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = _import_from_cwd(mod_name)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any import-time failure is the user's module's
        raise UserError(f"cannot import {mod_name!r} for `{what}` {spec!r}: {type(e).__name__}: {e}", field=what) from e
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise UserError(f"{mod_name!r} has no callable {func_name!r} (from `{what}` {spec!r})", field=what)
    return fn


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """`1,3,32,32` → (1, 3, 32, 32); the first number is the batch size and is replaced as needed."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise UserError(
            f"`input_shape` must be positive integers like 1,3,32,32 (batch first), got {text!r}", field="input_shape"
        )
    return shape


def resolve_model(spec: str, input_shape: tuple[int, ...] | None = None) -> ModelSpec:
    """A built-in ModelSpec, or one wrapping the user's factory.

    The example input of a user model comes from `input_shape` (random floats), else from the
    model's own `example_input(batch)` method or attribute.
    """
    from compress.models import hf

    if hf.is_hf(spec):
        return hf.hf_spec(spec)
    if ":" not in spec:
        try:
            return get_model(spec)
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
    factory = _load_callable(spec, "model")

    def build():
        try:
            model = factory()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"model factory {spec!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def example_input(batch: int = 1):
        if input_shape is not None:
            return torch.rand(batch, *input_shape[1:])
        model = build()
        ex = getattr(model, "example_input", None)
        if ex is None:
            raise UserError(
                f"model from {spec!r} needs an example input: give `input_shape` (1,C,H,W), give "
                "the module an example_input(batch) method, or use the Python API",
                field="input_shape",
            )
        return ex(batch) if callable(ex) else ex

    return ModelSpec(name=spec, build=build, example_input=example_input, data=None, description=f"user model {spec}")


def resolve_data(spec: str, model: ModelSpec | None = None):
    """Call the user's data function; it must return (train, eval) datasets or data loaders.

    A model that reads data files itself (`ModelSpec.data_from`, e.g. hf:PATH with sentences.txt)
    gets every spec that is not of the form module:function."""
    if model is not None and model.data_from is not None and (":" not in spec or Path(spec).exists()):
        return model.data_from(spec)
    fn = _load_callable(spec, "data")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"data function {spec!r} raised {type(e).__name__}: {e}") from e
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise UserError(
            f"data function {spec!r} must return (train, eval) datasets or loaders, got {type(out).__name__}"
        )
    for part, name in zip(out, ("train", "eval")):
        if not isinstance(part, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
            raise UserError(
                f"data function {spec!r}: the {name} part is a {type(part).__name__}, not a torch Dataset or DataLoader"
            )
    return tuple(out)


def model_data(spec: ModelSpec, data: str | None, required: bool = True):
    """(train, eval) data of a run: the user's `data` (a module:function, or a file the model reads itself),
    else the built-in model's own; None when there is none and it is not `required`."""
    if data:
        return resolve_data(data, spec)
    if spec.data is None:
        if not required:
            return None
        raise UserError(f"model {spec.name!r} has no built-in data: give `data` module:function", field="data")
    return spec.data()
