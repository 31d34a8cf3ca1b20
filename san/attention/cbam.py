"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018) — channel then spatial attention,
``x · Mc(x)`` then ``· Ms(x · Mc)`` (`san.attention.functional.cbam`)."""

import torch
from torch import Tensor, nn

from san.attention import functional
from san.attention.base import AttentionModule, Tap, batch_norm_settings, batch_norm_tensors
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
        # The same maths as one registered op (`san.kernels.cbam_op`); its batch norm returns the running statistics.
        first, second, bn = self.channel.mlp[0], self.channel.mlp[2], self.spatial.bn
        batch_stats, momentum, update = batch_norm_settings(bn, (x.shape[0], 1, *x.shape[2:]))
        params = (first.weight, first.bias, second.weight, second.bias, self.spatial.conv.weight)
        norm = batch_norm_tensors(bn, x)  # neutral values for any it lacks
        settings = (self.spatial.conv.padding[0], batch_stats, momentum, bn.eps)
        out, running_mean, running_var, *_ = cbam_op.call((x, *params, *norm), settings)
        if update:
            with torch.no_grad():
                bn.running_mean.copy_(running_mean)
                bn.running_var.copy_(running_var)
        return out
