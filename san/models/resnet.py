"""ResNet-18/50 (He et al.) as torchvision builds them (v1.5: the stride sits on the 3x3 conv), with attention
sites after every conv inside each block (the last one before the residual add) and at the end of each block."""

from typing import Any

from torch import Tensor, nn

from san.attention import apply_attention
from san.models.layers import ConvUnit, init_like_torchvision
from san.placement import BOTTLENECK, FULL, REFERENCE_BAM, REFERENCE_CBAM, AttentionPlan
from san.registry import register_model

STEMS = ("imagenet", "small")
_LAST_CONV = frozenset({FULL, REFERENCE_CBAM})


def _projection(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class BasicBlock(nn.Module):
    """Two 3x3 convs. ``attn1``/``attn2`` follow each conv; ``attn_out`` compares the block's output with its
    input (the block is the unit that ends at a bottleneck position)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, plan: AttentionPlan, end_tags: frozenset[str]):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.attn1 = plan.at({FULL}, planes, inplanes, 3)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attn2 = plan.at(_LAST_CONV, planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(inplanes, planes, stride)
        self.attn_out = plan.at(end_tags, planes, inplanes, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = apply_attention(self.attn1, self.relu(self.bn1(self.conv1(x))), x)
        residual = apply_attention(self.attn2, self.bn2(self.conv2(out)), out)
        identity = x if self.downsample is None else self.downsample(x)
        return apply_attention(self.attn_out, self.relu(residual + identity), x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, with the same attention sites as `BasicBlock`."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, plan: AttentionPlan, end_tags: frozenset[str]):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.attn1 = plan.at({FULL}, planes, inplanes, 1)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attn2 = plan.at({FULL}, planes, planes, 3)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.attn3 = plan.at(_LAST_CONV, outplanes, planes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(inplanes, outplanes, stride)
        self.attn_out = plan.at(end_tags, outplanes, inplanes, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = apply_attention(self.attn1, self.relu(self.bn1(self.conv1(x))), x)
        mid = apply_attention(self.attn2, self.relu(self.bn2(self.conv2(out))), out)
        residual = apply_attention(self.attn3, self.bn3(self.conv3(mid)), mid)
        identity = x if self.downsample is None else self.downsample(x)
        return apply_attention(self.attn_out, self.relu(residual + identity), x)


class ResNet(nn.Module):
    """ResNet with torchvision's layout. ``stem="imagenet"``: 7x7/2 conv + 3x3/2 max-pool; ``stem="small"``
    (28/32-px inputs): one 3x3/1 conv and no max-pool, so the stem is then no bottleneck position."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
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
        if stem == "imagenet":
            attn = plan.at({FULL, BOTTLENECK}, 64, in_chans, 7)
            self.stem = ConvUnit(in_chans, 64, 7, stride=2, padding=3, batch_norm=True, bias=False, attention=attn)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            attn = plan.at({FULL}, 64, in_chans, 3)
            self.stem = ConvUnit(in_chans, 64, 3, batch_norm=True, bias=False, attention=attn)
            self.maxpool = nn.Identity()
        inplanes = 64
        stages = []
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            end_tags = {BOTTLENECK} | ({REFERENCE_BAM} if index < 3 else set())
            blocks = []
            for position in range(depth):
                last = position == depth - 1
                tags = frozenset(end_tags if last else ())
                blocks.append(block(inplanes, planes, stride if position == 0 else 1, plan, tags))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_like_torchvision(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet18(**kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def resnet50(**kwargs: Any) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)
