"""What every attention module shares: the two-input flag, the taps that expose intermediate maps, and the choice,
made once, between the fused fast path (`san.kernels`) and the step-by-step formulation (`san.attention.functional`)."""

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# timm's use_fused_attn() idea: the default path is read once, here; SAN_FUSED_ATTENTION=0 makes every module built
# afterwards stepwise. A model switches for good with `use_fused_paths`, a block of code with `reference_formulation`.
FUSED_BY_DEFAULT = os.environ.get("SAN_FUSED_ATTENTION", "1") != "0"
_switch = threading.local()  # per thread, like torch's grad mode


@contextmanager
def reference_formulation() -> Iterator[None]:
    """Inside this block (in this thread) every attention module computes step by step, one autograd node per
    operation, as the papers write it — the formulation the fast paths are tested against and benchmarked beside,
    and the one whose taps `san.masks` reads."""
    _switch.depth = getattr(_switch, "depth", 0) + 1
    try:
        yield
    finally:
        _switch.depth -= 1


class IncompatibleConfiguration(ValueError):
    """A setting the paper itself leaves undefined at some position of a model (Table IX's "-"), as opposed to a
    mistaken argument: studies report such a cell as "-" with this message instead of failing."""


class Tap(nn.Identity):
    """A named pass-through point inside an attention module.

    Modules route each intermediate map (DoC, extrema, mask, ...) of their stepwise path through a ``Tap`` so that
    `san.masks` can read them with ordinary forward hooks, without the module keeping tensors alive or changing its
    output. The fused path materialises none of these maps: a reader asks for the stepwise one.
    """


class AttentionModule(nn.Module):
    """Base class of the attention modules.

    ``takes_previous`` tells the backbone hook whether ``forward`` wants the unit's input as a second argument
    (SAN compares two adjacent layers) or only the unit's output (CBAM, BAM). ``fused`` (set at construction from
    `FUSED_BY_DEFAULT`, later by `use_fused_paths`) picks the path; False: always the step-by-step formulation, more
    memory kept for backward (README, "Measured: what attention costs").
    """

    takes_previous: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.fused = FUSED_BY_DEFAULT

    def fast_path(self) -> bool:
        """Whether ``forward`` takes the fused path: ``fused`` set and not inside `reference_formulation`."""
        return self.fused and not getattr(_switch, "depth", 0)

    def tap(self, name: str, value: Tensor) -> Tensor:
        """``value`` through the tap ``name`` (`san.attention.functional`'s ``tap`` argument)."""
        return getattr(self, name)(value)

    def taps(self) -> dict[str, Tap]:
        """The module's taps by name, in forward order."""
        return {name: module for name, module in self.named_children() if isinstance(module, Tap)}


def attention_modules(model: nn.Module) -> dict[str, AttentionModule]:
    """Every attention module inside ``model``, keyed by its module path, in forward-definition order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AttentionModule)}


def use_fused_paths(model: nn.Module, fused: bool) -> nn.Module:
    """Set every attention module in ``model`` to its fused path (the default: less memory kept for backward) or,
    with ``fused=False``, to the step-by-step formulation for good; returns ``model``."""
    for module in attention_modules(model).values():
        module.fused = fused
    return model


def batch_norm_settings(bn: nn.modules.batchnorm._BatchNorm, shape: torch.Size) -> tuple[bool, float, bool]:
    """For a fused path, what ``bn.forward`` would do over an input of ``shape``: (batch statistics?, running-statistics
    factor, update them?), advancing ``num_batches_tracked`` as it does; batch statistics of one value per channel are
    refused, as torch refuses them."""
    batch_stats = bn.training or bn.running_mean is None
    if batch_stats and math.prod(shape) // shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    momentum = 0.0
    if update:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return batch_stats, momentum, update


def batch_norm_tensors(bn: nn.modules.batchnorm._BatchNorm, like: Tensor) -> list[Tensor]:
    """``bn``'s weight, bias, running mean and variance, the neutral value (1, 0, 0, 1) in place of any it lacks."""
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return [
        like.new_full((bn.num_features,), v) if t is None else t
        for t, v in zip(tensors, (1.0, 0.0, 0.0, 1.0), strict=True)
    ]
