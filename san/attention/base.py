"""What every attention module shares: the two-input flag, the taps that expose intermediate maps, and the switch
between the step-by-step (reference) formulation and the fused fast path."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_reference_depth = 0


@contextmanager
def reference_formulation() -> Iterator[None]:
    """Inside this block every attention module computes step by step, one autograd node per operation, as the
    papers write it — the formulation the fast paths are tested against and benchmarked beside."""
    global _reference_depth
    _reference_depth += 1
    try:
        yield
    finally:
        _reference_depth -= 1


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

    def taps(self) -> dict[str, Tap]:
        """The module's taps by name, in forward order."""
        return {name: module for name, module in self.named_children() if isinstance(module, Tap)}

    def use_fast_path(self) -> bool:
        """Whether ``forward`` may take the fused path: not inside `reference_formulation`, and no tap is being
        watched (the fused path never materialises the intermediate maps the taps show)."""
        if _reference_depth:
            return False
        return not any(tap._forward_hooks or tap._forward_pre_hooks for tap in self.taps().values())


def attention_modules(model: nn.Module) -> dict[str, AttentionModule]:
    """Every attention module inside ``model``, keyed by its module path, in forward-definition order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AttentionModule)}
