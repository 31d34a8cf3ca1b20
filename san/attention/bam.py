"""BAM: Bottleneck Attention Module (Park et al., BMVC 2018) — parallel channel and dilated spatial branches,
``x · (1 + σ(Mc + Ms))`` (`san.attention.functional.bam`)."""

import torch
from torch import Tensor, nn

from san.attention import functional
from san.attention.base import AttentionModule, Tap
from san.catalog import COMBINES
from san.kernels.fused import bam


class ChannelBranch(nn.Module):
    """Mc: the average-pooled descriptor (N×C) → MLP (C → C/r → C, BN + ReLU in between) → one logit per channel."""

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

    def forward(self, descriptor: Tensor) -> Tensor:
        return self.mlp(descriptor)


class SpatialBranch(nn.Module):
    """Ms: 1x1 reduce → ``num_dilated`` 3x3 convs with dilation ``dilation`` → 1x1 to one logit per position."""

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
        # The fused path is eager-only: under torch.compile inductor fuses the stepwise formulation itself.
        if self.fast_path() and not torch.compiler.is_compiling():
            return bam(x, self.channel.mlp, list(self.spatial.body), self.combine == "product")
        return functional.bam(x, self.channel, self.spatial, self.combine, self.tap)
