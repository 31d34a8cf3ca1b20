"""The model registry: model names → factories, and the names of attention modules and placements.

Which models, attention modules and placements exist is declared in `san.catalog` (no torch: the service lists
and validates names from it); model files register their factories with ``@register_model``, which refuses a
model the catalog does not declare. Only building a model imports the models, and torch.
"""

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from san.catalog import ATTENTION_NAMES, INPUT_KINDS, MODELS, PLACEMENTS

if TYPE_CHECKING:
    from torch import nn

_MODELS: dict[str, Callable[..., "nn.Module"]] = {}

__all__ = [
    "INPUT_KINDS",
    "build_model",
    "list_attention",
    "list_models",
    "list_placements",
    "model_inputs",
    "register_model",
]


def register_model(factory: Callable[..., "nn.Module"] | None = None, *, inputs: str | None = None):
    """Register ``factory`` under its function name, which `san.catalog.MODELS` declares with what it takes;
    ``inputs`` ("images" or "sequences"), when given, must say the same."""
    if inputs is not None and inputs not in INPUT_KINDS:
        raise ValueError(f"inputs={inputs!r}: one of {', '.join(INPUT_KINDS)}")

    def register(factory: Callable[..., "nn.Module"]) -> Callable[..., "nn.Module"]:
        name = factory.__name__
        if name not in MODELS:
            raise ValueError(f"model {name!r} is not declared in san.catalog.MODELS: declare it there")
        if inputs is not None and inputs != MODELS[name]:
            raise ValueError(f"model {name!r} registered as taking {inputs}; san.catalog.MODELS says {MODELS[name]}")
        _MODELS[name] = factory
        return factory

    return register if factory is None else register(factory)


def model_inputs(name: str) -> str:
    """``images`` or ``sequences``: what model ``name`` takes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def _load_models() -> None:
    importlib.import_module("san.models")  # importing the model files runs their @register_model


def list_models() -> list[str]:
    """Model names, in registration order."""
    return list(MODELS)


def list_attention() -> list[str]:
    """Attention module names, ``none`` first."""
    return list(ATTENTION_NAMES)


def list_placements() -> list[str]:
    """Attention placement names."""
    return list(PLACEMENTS)


def build_model(
    name: str, num_classes: int, attention: str = "none", placement: str = "bottleneck", **kwargs: Any
) -> "nn.Module":
    """Build model ``name`` with ``attention`` at ``placement``.

    Keyword arguments go to the model factory: ``in_chans``, ``stem`` (``imagenet`` or ``small``) and
    ``attention_kwargs`` (for the attention modules, e.g. ``{"use_abs": False}``).
    """
    _load_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return _MODELS[name](num_classes=num_classes, attention=attention, placement=placement, **kwargs)
