"""BlurPool (Zhang, ICML 2019) as ffcv-imagenet applies it: blur before every strided conv, for shift-invariance."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BlurPoolConv2d(nn.Module):
    """A depthwise 3x3 binomial blur, then the wrapped (strided) conv."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        self.register_buffer("blur", kernel.expand(conv.in_channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        blurred = F.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def add_blurpool(model: nn.Module) -> int:
    """Wrap every strided conv with at least 16 input channels (ffcv-imagenet's rule); returns how many."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16
    ]
    for parent, name, child in targets:
        setattr(parent, name, BlurPoolConv2d(child))
    return len(targets)
