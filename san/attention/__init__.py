"""Attention modules and the string factory that builds them by name (timm's ``create_attn`` idea)."""

from functools import partial

from torch import nn

from san.attention.bam import BAM
from san.attention.base import (
    AttentionModule,
    IncompatibleConfiguration,
    Tap,
    attention_modules,
    reference_formulation,
)
from san.attention.cbam import CBAM
from san.attention.san import SAN

# Adding a module is one entry here. SAN-d's dilation 2 is our default; the paper does not state its value.
_ATTENTION: dict[str, type[AttentionModule] | partial] = {
    "san-c": partial(SAN, dilation=1),
    "san-d": partial(SAN, dilation=2),
    "cbam": CBAM,
    "bam": BAM,
}
ATTENTION_NAMES = ("none", *_ATTENTION)


def attention_class(name: str) -> type[AttentionModule]:
    """The class behind a registered attention name (``ValueError`` for unknown names and ``none``)."""
    entry = _ATTENTION.get(name)
    if entry is None:
        raise ValueError(f"unknown attention {name!r}; choose one of: {', '.join(_ATTENTION)}")
    return entry.func if isinstance(entry, partial) else entry


def create_attention(
    name: str,
    channels: int,
    *,
    prev_channels: int | None = None,
    feature_kernel_size: int | None = None,
    **kwargs: object,
) -> AttentionModule | None:
    """Build the attention module ``name`` for a ``channels``-channel feature map, or ``None`` for ``"none"``.

    ``prev_channels`` (C' of the unit's input) and ``feature_kernel_size`` (the feature branch's kernel at this
    position) describe the position; they reach only the modules that use them (SAN), and ``kwargs`` override
    them (``kernel_size=5`` beats ``feature_kernel_size``).
    """
    if name not in ATTENTION_NAMES:
        raise ValueError(f"unknown attention {name!r}; choose one of: {', '.join(ATTENTION_NAMES)}")
    if name == "none":
        return None
    if attention_class(name).takes_previous:
        kwargs.setdefault("prev_channels", prev_channels)
        if feature_kernel_size is not None:
            kwargs.setdefault("kernel_size", feature_kernel_size)
    return _ATTENTION[name](channels, **kwargs)


def apply_attention(attention: nn.Module | None, y, y_prev):
    """Apply ``attention`` to a unit's output ``y``; two-input modules also get the unit's input ``y_prev``."""
    if attention is None:
        return y
    return attention(y, y_prev) if attention.takes_previous else attention(y)


__all__ = [
    "ATTENTION_NAMES",
    "BAM",
    "CBAM",
    "SAN",
    "AttentionModule",
    "IncompatibleConfiguration",
    "Tap",
    "apply_attention",
    "attention_class",
    "attention_modules",
    "create_attention",
    "reference_formulation",
]
