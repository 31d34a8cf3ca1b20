"""Building blocks shared by the backbones."""

from collections.abc import Iterator

from torch import Tensor, nn

from san.attention import AttentionModule, apply_attention


class ConvUnit(nn.Module):
    """One conv layer — conv, optional batch norm, activation — followed by its attention site.

    The conv keeps its bias beside batch norm unless ``bias=False``, as torchvision's VGG-BN does.

    The attention (if any) compares the layer's output with the layer's input.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        batch_norm: bool = False,
        bias: bool = True,
        activation: type[nn.Module] = nn.ReLU,
        attention: nn.Module | None = None,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = activation(inplace=True) if activation is nn.ReLU else activation()
        self.attn = attention

    def forward(self, x: Tensor) -> Tensor:
        return apply_attention(self.attn, self.act(self.bn(self.conv(x))), x)


def backbone_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The model's modules outside any attention module, so backbone init leaves attention's own init alone."""
    inside_attention = {id(m) for a in model.modules() if isinstance(a, AttentionModule) for m in a.modules()}
    return (m for m in model.modules() if id(m) not in inside_attention)


def init_like_torchvision(model: nn.Module, linear_std: float | None = None) -> None:
    """torchvision's VGG/ResNet init: Kaiming-normal (fan-out) convs, unit BN, optionally N(0, std) linears."""
    for m in backbone_modules(model):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
