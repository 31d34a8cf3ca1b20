"""What every attention module shares: the two-input flag and the taps that expose intermediate maps."""

from torch import nn


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


def attention_modules(model: nn.Module) -> dict[str, AttentionModule]:
    """Every attention module inside ``model``, keyed by its module path, in forward-definition order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AttentionModule)}
