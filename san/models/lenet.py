"""LeNet-5 as the SAN paper uses it (Section IV-B1): two tanh conv layers of 6 and 16 5x5 kernels, each followed
by average pooling, then dense 120 / 84 (tanh) and the class layer (softmax lives in the loss)."""

from typing import Any

from torch import Tensor, nn

from san.models.layers import ConvUnit
from san.placement import BOTTLENECK, FULL, REFERENCE_BAM, REFERENCE_CBAM, AttentionPlan
from san.registry import register_model

STEMS = ("small",)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 inputs (conv1 pads by 2, as for MNIST); an adaptive pool makes other sizes work too.

    Both conv layers end right before a pooling layer, so ``bottleneck`` and ``full`` place the same two modules
    (the paper's Table IV note).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        stem: str = "small",
        attention: str = "none",
        placement: str = "bottleneck",
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"lenet5 has no stem {stem!r}; choose one of: {', '.join(STEMS)}")
        plan = AttentionPlan(attention, placement, attention_kwargs or {}, model=type(self).__name__)
        every = {BOTTLENECK, FULL, REFERENCE_CBAM}
        # BAM's reference placement is between feature stages: after conv1 only.
        attn1 = plan.at(every | {REFERENCE_BAM}, 6, in_chans, 5)
        attn2 = plan.at(every, 16, 6, 5)
        self.features = nn.Sequential(
            ConvUnit(in_chans, 6, 5, padding=2, activation=nn.Tanh, attention=attn1),
            nn.AvgPool2d(2),
            ConvUnit(6, 16, 5, padding=0, activation=nn.Tanh, attention=attn2),
            nn.AvgPool2d(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.Tanh(),
            nn.Linear(120, 84),
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model
def lenet5(**kwargs: Any) -> LeNet5:
    return LeNet5(**kwargs)
