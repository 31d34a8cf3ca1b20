"""BAM: Bottleneck Attention Module (Park et al., BMVC 2018) — parallel channel and dilated spatial branches,
``x · (1 + σ(Mc + Ms))`` (`san.attention.functional.bam`)."""

import torch
from torch import Tensor, nn

from san.attention import functional
from san.attention.base import AttentionModule, Tap, batch_norm_settings, batch_norm_tensors
from san.catalog import COMBINES
from san.kernels import bam_op


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
        if not self.fast_path():
            return functional.bam(x, self.channel, self.spatial, self.combine, self.tap)
        # The same maths as one registered op (`san.kernels.bam_op`); its batch norms return the running statistics.
        mlp, body = self.channel.mlp, list(self.spatial.body)  # a list: slicing a Sequential builds new ones
        norms = [mlp[2], *body[1::3]]
        shapes = [(x.shape[0], mlp[2].num_features)] + [(x.shape[0], bn.num_features, *x.shape[2:]) for bn in norms[1:]]
        batch_stats, momentum, update = zip(*map(batch_norm_settings, norms, shapes), strict=True)
        tensors = [batch_norm_tensors(bn, x) for bn in norms]
        params = [mlp[1].weight, mlp[1].bias, *tensors[0][:2], mlp[4].weight, mlp[4].bias]
        for conv, norm in zip(body[0::3], tensors[1:], strict=False):
            params += [conv.weight, conv.bias, *norm[:2]]
        params += [body[-1].weight, body[-1].bias]
        running = torch.stack([t for norm in tensors for t in norm[2:]])
        settings = (body[3].dilation[0], list(batch_stats), list(momentum), [bn.eps for bn in norms])
        out, _, _, moved = bam_op.call(x, params, running, *settings, self.combine == "product")
        kept = [i for i, bn in enumerate(norms) if update[i]]
        if kept:  # one call for all: a copy each costs more than the copying
            targets = [buffer for i in kept for buffer in (norms[i].running_mean, norms[i].running_var)]
            with torch.no_grad():
                rows = moved.unbind()
                torch._foreach_copy_(targets, [rows[row] for i in kept for row in (2 * i, 2 * i + 1)])
        return out
