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
    use_fused_paths,
)
from san.attention.cbam import CBAM
from san.attention.ran import RAN
from san.attention.san import SAN
from san.catalog import ATTENTION_NAMES

# Adding a module is one entry here. SAN-d's dilation 2 is our default; the paper does not state its value.
_ATTENTION: dict[str, type[AttentionModule] | partial] = {
    "san-c": partial(SAN, dilation=1),
    "san-d": partial(SAN, dilation=2),
    "cbam": CBAM,
    "bam": BAM,
    "ran": RAN,
}
# The names are declared in san.catalog (read without torch by the service): this table must build exactly those.
if ("none", *_ATTENTION) != ATTENTION_NAMES:
    raise RuntimeError("san.catalog.ATTENTION_PARAMETERS and this module's _ATTENTION name different modules")
# What a backbone's attention sites carry: 2-D feature maps (CNNs) or sequences (recurrent models).
INPUTS = {2: "2-D feature maps (N×C×H×W)", 1: "sequences (N×C×T)"}
_KIND = {2: "this CNN", 1: "this recurrent model"}  # for a model that does not give its name


def attention_class(name: str) -> type[AttentionModule]:
    """The class behind a registered attention name (``ValueError`` for unknown names and ``none``)."""
    entry = _ATTENTION.get(name)
    if entry is None:
        raise ValueError(f"unknown attention {name!r}; choose one of: {', '.join(_ATTENTION)}")
    return entry.func if isinstance(entry, partial) else entry


def attention_dims(name: str) -> tuple[int, ...]:
    """The map dimensionalities attention ``name`` works on (keys of `INPUTS`); ``none`` works on all.

    A module class declares them as ``supported_dims``; one that does not (CBAM, BAM) is an image module.
    """
    if name == "none":
        return tuple(INPUTS)
    return getattr(attention_class(name), "supported_dims", (2,))


def attention_for(dims: int) -> list[str]:
    """The attention names a backbone whose sites carry ``dims``-dimensional maps can take, ``none`` first."""
    return [name for name in ATTENTION_NAMES if dims in attention_dims(name)]


def check_inputs(name: str, dims: int, model: str = "") -> None:
    """Raise `IncompatibleConfiguration` unless attention ``name`` works on the ``dims``-dimensional maps of
    ``model``'s attention sites (an image module in a recurrent model, a sequence module in a CNN)."""
    if name in ATTENTION_NAMES and dims not in attention_dims(name):
        inputs = " or ".join(INPUTS[d] for d in attention_dims(name))
        raise IncompatibleConfiguration(
            f"{model or _KIND[dims]} carries {INPUTS[dims]} and attention {name!r} works on {inputs} only; "
            f"choose one of: {', '.join(attention_for(dims))}"
        )


def create_attention(
    name: str,
    channels: int,
    *,
    prev_channels: int | None = None,
    feature_kernel_size: int | None = None,
    dims: int = 2,
    **kwargs: object,
) -> AttentionModule | None:
    """Build the attention module ``name`` for a ``channels``-channel feature map, or ``None`` for ``"none"``.

    ``prev_channels`` (C' of the unit's input) and ``feature_kernel_size`` (the feature branch's kernel at this
    position) describe the position; they reach only the modules that use them (SAN), and ``kwargs`` override
    them (``kernel_size=5`` beats ``feature_kernel_size``). ``dims`` — 2 for feature maps, 1 for sequences — is
    the position's too, and no keyword overrides it: a module that works on both (SAN) is built for it, one that
    works on the other kind raises `IncompatibleConfiguration`.
    """
    if name not in ATTENTION_NAMES:
        raise ValueError(f"unknown attention {name!r}; choose one of: {', '.join(ATTENTION_NAMES)}")
    if name == "none":
        return None
    check_inputs(name, dims)
    if len(attention_dims(name)) > 1:
        kwargs["dims"] = dims
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
    "INPUTS",
    "RAN",
    "SAN",
    "AttentionModule",
    "IncompatibleConfiguration",
    "Tap",
    "apply_attention",
    "attention_class",
    "attention_dims",
    "attention_for",
    "attention_modules",
    "check_inputs",
    "create_attention",
    "reference_formulation",
    "use_fused_paths",
]
