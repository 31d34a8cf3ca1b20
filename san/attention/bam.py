"""BAM: Bottleneck Attention Module (Park et al., BMVC 2018) — parallel channel and dilated spatial branches."""

import torch
from torch import Tensor, nn

from san.attention.base import AttentionModule, Tap
from san.attention.fused import bam
from san.catalog import COMBINES


class ChannelBranch(nn.Module):
    """Global average pool → MLP (C → C/r → C, BN + ReLU in between) → one logit per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.mean((2, 3)))[:, :, None, None]


class SpatialBranch(nn.Module):
    """1x1 reduce → ``num_dilated`` 3x3 convs with dilation ``dilation`` → 1x1 to one logit per position."""

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4, num_dilated: int = 2) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        for _ in range(num_dilated):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def stages(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None, str]]:
        """The body as (conv, batch norm, activation) stages, for `san.attention.fused.bam`."""
        layers = list(self.body)
        stages = [(layers[i], layers[i + 1], "relu") for i in range(0, len(layers) - 1, 3)]
        return [*stages, (layers[-1], None, "identity")]


class BAM(AttentionModule):
    """``x * (1 + M)`` with ``M = sigmoid(Mc + Ms)`` as the BAM paper writes it (``combine="sum"``).

    ``combine="product"`` reproduces the authors' reference code instead, which computes ``1 + sigmoid(Mc * Ms)``.
    """

    def __init__(
        self, channels: int, reduction: int = 16, dilation: int = 4, num_dilated: int = 2, combine: str = "sum"
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"unknown BAM combine {combine!r}; choose one of: {', '.join(COMBINES)}")
        self.combine = combine
        self.channel = ChannelBranch(channels, reduction)
        self.spatial = SpatialBranch(channels, reduction, dilation, num_dilated)
        self.mask = Tap()

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fast_path():
            return bam(x, self.channel, self.spatial.stages(), self.combine == "product")
        channel, spatial = self.channel(x), self.spatial(x)
        logits = channel + spatial if self.combine == "sum" else channel * spatial
        return x * (1 + self.mask(torch.sigmoid(logits)))
