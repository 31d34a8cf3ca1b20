"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018) — channel then spatial attention,
``x · Mc(x)`` then ``· Ms(x · Mc)`` (`san.attention.functional.cbam`)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from san.attention import functional
from san.attention.base import AttentionModule, Tap
from san.kernels import cbam_op


class ChannelAttention(nn.Module):
    """Mc's shared MLP (1x1 convs, reduction ``reduction``) over the average- and max-pooled channel descriptors."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, descriptor: Tensor) -> Tensor:
        return self.mlp(descriptor)


class SpatialAttention(nn.Module):
    """Ms's logits: a ``kernel_size`` conv (+BN, as the reference code) over the channel-wise max and mean maps.

    The BN's running statistics move with momentum 0.01, as in the authors' code (their ``BasicConv``), not
    PyTorch's default 0.1: a 1-channel map's batch statistics are noisy, and the slower average is theirs.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.bn(self.conv(pooled))


class CBAM(AttentionModule):
    """``x * Mc`` then ``* Ms``: channel attention followed by spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel_size)
        self.channel_mask = Tap()
        self.mask = Tap()

    def forward(self, x: Tensor) -> Tensor:
        if not self.fast_path():
            return functional.cbam(x, self.channel, self.spatial, self.tap)
        # The same maths on registered ops (`san.kernels.cbam_op`): one pass over x for each full-size step.
        first, second = self.channel.mlp[0], self.channel.mlp[2]
        descriptors = torch.cat(cbam_op.descriptors(x))  # [mean_hw x; max_hw x], 2N×C
        logits = F.linear(
            F.relu(F.linear(descriptors, first.weight.flatten(1), first.bias)), second.weight.flatten(1), second.bias
        )
        channel_mask = torch.sigmoid(logits[: x.shape[0]] + logits[x.shape[0] :])
        conv = self.spatial.conv
        spatial = cbam_op.spatial(x, channel_mask, conv.weight, conv.padding[0])  # conv([max_c; mean_c] x·Mc)
        return cbam_op.apply(x, channel_mask, torch.sigmoid(self.spatial.bn(spatial)))
