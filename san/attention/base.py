"""What every attention module shares: the two-input flag, the taps that expose intermediate maps, and the switch
between the step-by-step (reference) formulation and the fused fast path."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules import module as module_hooks

_switch = threading.local()  # per thread, like torch's grad mode
# The fast paths call these layers' functional forms themselves; a subclass (SyncBatchNorm, a custom conv) may do
# something else, so it keeps the stepwise path.
_FAST_LAYER_TYPES = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_LAYER_FAMILIES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")  # fmt: skip


@contextmanager
def reference_formulation() -> Iterator[None]:
    """Inside this block (in this thread) every attention module computes step by step, one autograd node per
    operation, as the papers write it — the formulation the fast paths are tested against and benchmarked beside."""
    _switch.depth = getattr(_switch, "depth", 0) + 1
    try:
        yield
    finally:
        _switch.depth -= 1


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)  # fmt: skip


class IncompatibleConfiguration(ValueError):
    """A setting the paper itself leaves undefined at some position of a model (Table IX's "-"), as opposed to a
    mistaken argument: studies report such a cell as "-" with this message instead of failing."""


class Tap(nn.Identity):
    """A named pass-through point inside an attention module.

    Modules route each intermediate map (DoC, extrema, mask, ...) through a ``Tap`` so that `san.masks` can read
    them with ordinary forward hooks, without the module keeping tensors alive or changing its output.
    """


class AttentionModule(nn.Module):
    """Base class of the attention modules.

    ``takes_previous`` tells the backbone hook whether ``forward`` wants the unit's input as a second argument
    (SAN compares two adjacent layers) or only the unit's output (CBAM, BAM).
    """

    takes_previous: bool = False
    # False: always the step-by-step formulation (`use_fused_paths`): more memory kept for backward, and on small
    # CPU maps faster for SAN and BAM (README, "Measured: what attention costs").
    fused: bool = True

    def taps(self) -> dict[str, Tap]:
        """The module's taps by name, in forward order."""
        return {name: module for name, module in self.named_children() if isinstance(module, Tap)}

    def use_fast_path(self) -> bool:
        """Whether ``forward`` may take the fused path: ``fused`` set, not inside `reference_formulation`, no hook
        on the module or anything inside it (the fused path runs no submodule and materialises none of the maps the
        taps show), no global module hook, and only the plain layer types the fused path reimplements."""
        if not self.fused or getattr(_switch, "depth", 0):
            return False
        if any(getattr(module_hooks, name, None) for name in _GLOBAL_HOOKS):
            return False
        for module in self.modules():
            if _hooked(module):
                return False
            if isinstance(module, _LAYER_FAMILIES) and type(module) not in _FAST_LAYER_TYPES:
                return False
        return True


def attention_modules(model: nn.Module) -> dict[str, AttentionModule]:
    """Every attention module inside ``model``, keyed by its module path, in forward-definition order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AttentionModule)}


def use_fused_paths(model: nn.Module, fused: bool) -> nn.Module:
    """Set every attention module in ``model`` to its fused path (the default: less memory kept for backward) or,
    with ``fused=False``, to the step-by-step formulation for good; returns ``model``."""
    for module in attention_modules(model).values():
        module.fused = fused
    return model
