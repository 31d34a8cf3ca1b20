"""The model registry: model names → factories, and the names of attention modules and placements.

Model files register their factories with ``@register_model``; this module is the one source of truth for
which models, attention modules and placements exist.
"""

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from san.attention import ATTENTION_NAMES
from san.placement import PLACEMENTS

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INPUTS: dict[str, str] = {}  # model name → what it takes: "images" (N×C×H×W) or "sequences" (N×T×F)
INPUT_KINDS = ("images", "sequences")


def register_model(factory: Callable[..., nn.Module] | None = None, *, inputs: str = "images"):
    """Register ``factory`` under its function name; ``@register_model(inputs="sequences")`` for a model of
    N×T×F sequences."""
    if inputs not in INPUT_KINDS:
        raise ValueError(f"inputs={inputs!r}: one of {', '.join(INPUT_KINDS)}")

    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[factory.__name__] = factory
        _INPUTS[factory.__name__] = inputs
        return factory

    return register if factory is None else register(factory)


def model_inputs(name: str) -> str:
    """``images`` or ``sequences``: what model ``name`` takes."""
    _load_models()
    if name not in _INPUTS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")
    return _INPUTS[name]


def _load_models() -> None:
    importlib.import_module("san.models")  # importing the model files runs their @register_model


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    _load_models()
    return list(_MODELS)


def list_attention() -> list[str]:
    """Attention module names, ``none`` first."""
    return list(ATTENTION_NAMES)


def list_placements() -> list[str]:
    """Attention placement names."""
    return list(PLACEMENTS)


def build_model(
    name: str, num_classes: int, attention: str = "none", placement: str = "bottleneck", **kwargs: Any
) -> nn.Module:
    """Build model ``name`` with ``attention`` at ``placement``.

    Keyword arguments go to the model factory: ``in_chans``, ``stem`` (``imagenet`` or ``small``) and
    ``attention_kwargs`` (for the attention modules, e.g. ``{"use_abs": False}``).
    """
    _load_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")
    return _MODELS[name](num_classes=num_classes, attention=attention, placement=placement, **kwargs)
