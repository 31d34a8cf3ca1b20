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


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``factory`` under its function name."""
    _MODELS[factory.__name__] = factory
    return factory


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
