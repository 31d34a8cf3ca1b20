"""Where attention goes in a backbone: placements, attention sites and the plan that fills them.

A backbone marks every place an attention module may sit (a *site*) with the placements that use it, and asks
the model's `AttentionPlan` for a module there. A site sits at the end of a *unit* — a conv layer (conv, norm,
activation), a whole residual block, or a recurrent layer — and a SAN module there compares the unit's output
with the unit's input (the paper's Y_l and Y_{l-1}); single-input modules see the output only.

A CNN's sites carry 2-D feature maps, a recurrent model's sequences (``AttentionPlan(dims=1)``); a module that
works on the other kind only — RAN in a CNN, CBAM or BAM in ``lstm4`` — is refused when the plan is made, with
`san.attention.IncompatibleConfiguration`. SAN works on both.

Placements:
- ``bottleneck``: one module right before every down-sampling: before each pooling layer, before each strided
  stage transition and before the final global pooling (the paper's Fig. 2 and 7).
- ``full``: one module after every conv layer of the feature path (in a residual block: after each conv,
  the last one before the residual add; the projection shortcut is not a feature layer and gets none); in
  ``lstm4``, after every recurrent layer.
- ``reference``: each competitor's own paper placement — CBAM after every conv layer, in ResNets inside every
  residual block before the add (Woo et al.); BAM at every bottleneck *between* two feature stages (Park et
  al.: after ResNet stages 1–3). SAN's own paper placement is ``bottleneck`` (Fig. 7); RAN's paper gives none
  for a stacked LSTM, so RAN's ``reference`` is ``bottleneck`` as well.

Attention modules per model (C = CBAM, B = BAM at ``reference``; SAN and RAN at ``reference`` = ``bottleneck``):

| model              | bottleneck | full | reference C | reference B |
|--------------------|-----------:|-----:|------------:|------------:|
| lenet5             |          2 |    2 |           2 |           1 |
| vgg16, _bn, vgg16_c |          5 |   13 |          13 |           4 |
| vgg19, vgg19_bn    |          5 |   16 |          16 |           4 |
| resnet18           |    5 (4)\\* |   17 |           8 |           3 |
| resnet50           |    5 (4)\\* |   49 |          16 |           3 |
| lstm4              |          2 |    4 |   refused\\** |   refused\\** |

\\* with ``stem="small"`` the stem has no max-pool after it, so it is no bottleneck position.
\\** CBAM and BAM take 2-D maps only and RAN sequences only: ``lstm4`` takes none, san-c, san-d and ran; the
CNNs every module but ran.
``lstm4``'s bottlenecks are after recurrent layers 2 and 4, each right before a temporal average pooling.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from san.attention import ATTENTION_NAMES, AttentionModule, check_inputs, create_attention
from san.catalog import PLACEMENTS

# Site tags: a site lists the tags under which it receives a module.
BOTTLENECK = "bottleneck"
FULL = "full"
REFERENCE_CBAM = "reference-cbam"
REFERENCE_BAM = "reference-bam"
_REFERENCE_TAGS = {"cbam": REFERENCE_CBAM, "bam": REFERENCE_BAM}


@dataclass(frozen=True)
class AttentionPlan:
    """Which attention module a model places, where, and with which keyword arguments.

    ``dims`` is what the model's sites carry — 2: feature maps (CNNs), 1: sequences (recurrent models) — and
    ``model`` the model's name for messages; a module that cannot work on those inputs raises
    `IncompatibleConfiguration` here, before any site is filled.
    """

    name: str = "none"
    placement: str = "bottleneck"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dims: int = 2
    model: str = ""

    def __post_init__(self) -> None:
        if self.name not in ATTENTION_NAMES:
            raise ValueError(f"unknown attention {self.name!r}; choose one of: {', '.join(ATTENTION_NAMES)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of: {', '.join(PLACEMENTS)}")
        if "dims" in self.kwargs:
            raise ValueError("dims is set by the model at each position, not by attention_kwargs")
        check_inputs(self.name, self.dims, self.model)

    @property
    def tag(self) -> str:
        """The site tag this plan fills."""
        if self.placement == "reference":
            return _REFERENCE_TAGS.get(self.name, BOTTLENECK)
        return self.placement

    def at(
        self, tags: set[str] | frozenset[str], channels: int, prev_channels: int, kernel_size: int
    ) -> AttentionModule | None:
        """The module for a site with ``tags`` whose unit maps ``prev_channels`` to ``channels`` channels.

        ``kernel_size`` is the feature branch's kernel at the site; SAN's smoothing conv takes it, except that a
        1x1 layer gives 3 (a 1x1 smoothing conv could not smooth). A recurrent layer has no kernel; its sites
        give 3 as well.
        """
        if self.tag not in tags:
            return None
        return create_attention(
            self.name,
            channels,
            prev_channels=prev_channels,
            feature_kernel_size=max(kernel_size, 3),
            dims=self.dims,
            **dict(self.kwargs),
        )
