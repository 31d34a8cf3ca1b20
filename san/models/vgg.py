"""VGG-16/19 (Simonyan & Zisserman) as torchvision builds them, with and without batch norm, and ``vgg16_c``:
the SAN paper's text (Section IV-B2) — VGG's configuration C, whose layers 7, 10 and 13 are 1x1 convs."""

from typing import Any

from torch import Tensor, nn

from san.models.layers import ConvUnit, init_like_torchvision
from san.placement import BOTTLENECK, FULL, REFERENCE_BAM, REFERENCE_CBAM, AttentionPlan
from san.registry import register_model

STEMS = ("imagenet", "small")

# Five groups of (channels, kernel) conv layers; a 2x2 max-pool ends every group.
_3 = 3
CONFIGS: dict[str, list[list[tuple[int, int]]]] = {
    "C": [
        [(64, _3)] * 2,
        [(128, _3)] * 2,
        [(256, _3), (256, _3), (256, 1)],
        [(512, _3), (512, _3), (512, 1)],
        [(512, _3), (512, _3), (512, 1)],
    ],
    "D": [[(64, _3)] * 2, [(128, _3)] * 2, [(256, _3)] * 3, [(512, _3)] * 3, [(512, _3)] * 3],
    "E": [[(64, _3)] * 2, [(128, _3)] * 2, [(256, _3)] * 4, [(512, _3)] * 4, [(512, _3)] * 4],
}


class VGG(nn.Module):
    """VGG with an attention site after every conv layer.

    ``stem="imagenet"`` is torchvision's head (7x7 adaptive pool, 4096-4096 classifier) for 224-px inputs;
    ``stem="small"`` is the common 32-px head (global pool, 512-512 classifier), since five max-pools leave a
    1x1 map there. The feature layers are the same in both.
    """

    def __init__(
        self,
        config: str,
        batch_norm: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        attention: str = "none",
        placement: str = "bottleneck",
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        plan = AttentionPlan(attention, placement, attention_kwargs or {}, model=type(self).__name__)
        layers: list[nn.Module] = []
        channels = in_chans
        groups = CONFIGS[config]
        for index, group in enumerate(groups):
            for position, (width, kernel) in enumerate(group):
                tags = {FULL, REFERENCE_CBAM}
                if position == len(group) - 1:
                    tags.add(BOTTLENECK)
                    if index < len(groups) - 1:
                        tags.add(REFERENCE_BAM)
                attn = plan.at(tags, width, channels, kernel)
                layers.append(ConvUnit(channels, width, kernel, batch_norm=batch_norm, attention=attn))
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        pooled, hidden = (7, 4096) if stem == "imagenet" else (1, 512)
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )
        init_like_torchvision(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))


@register_model
def vgg16(**kwargs: Any) -> VGG:
    return VGG("D", **kwargs)


@register_model
def vgg16_bn(**kwargs: Any) -> VGG:
    return VGG("D", batch_norm=True, **kwargs)


@register_model
def vgg16_c(**kwargs: Any) -> VGG:
    return VGG("C", **kwargs)


@register_model
def vgg19(**kwargs: Any) -> VGG:
    return VGG("E", **kwargs)


@register_model
def vgg19_bn(**kwargs: Any) -> VGG:
    return VGG("E", batch_norm=True, **kwargs)
