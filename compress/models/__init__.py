"""Built-in models and the data they train on (all offline: nothing is downloaded).

`get_model(name)` returns a `ModelSpec`: a factory, an example input and, where the
model ships with data, a function returning (train, eval) datasets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], torch.nn.Module]
    example_input: Callable[[int], torch.Tensor | tuple]  # batch size -> inputs
    data: Callable[[], tuple] | None = None  # () -> (train_dataset, eval_dataset)
    description: str = ""
    # (--data string or None) -> (train, eval): data read with the model's own tokenizer/task (hf:PATH)
    data_from: Callable[[str | None], tuple] | None = None


def is_pretrained(model: str | None) -> bool:
    """A `model` string that loads trained weights itself (hf:PATH): its start is a dense model, not random."""
    return isinstance(model, str) and model.startswith("hf:")


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def model_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_model(name: str) -> ModelSpec:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown model {name!r}; built-in models: {', '.join(sorted(_REGISTRY))} "
            "(or pass module:factory / path.py:factory)"
        )
    return _REGISTRY[name]


def _load_all() -> None:
    # Importing a module registers its models.
    pass

    for mod in ("cifar_resnet", "resnet50", "mobilenetv2", "vit", "bert"):
        try:
            __import__(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # not written yet / optional
            if e.name != f"{__name__}.{mod}":
                raise
