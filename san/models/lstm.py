"""LSTM-4 as the SAN paper uses it for time series (Section IV-B4, Tables VI–VII): four LSTM layers of 64 units,
average pooling over time after every two recurrent layers, and a dense output layer — softmax for
classification (the softmax lives in the loss), linear for forecasting (``num_classes`` = the number of outputs).

Input: N × T × F float sequences (batch, time steps, features); output: N × ``num_classes``.

What the paper leaves open, and what this model does:
- the pooling: kernel 2, stride 2, ``ceil_mode=True`` (an odd last step is averaged on its own), so any T >= 1
  works; after the second pooling a mean over the remaining steps feeds the dense layer, which makes the head
  independent of T;
- the attention sites: ``bottleneck`` puts one module before each pooling — after LSTM layers 2 and 4 — and
  ``full`` one after every recurrent layer (4); ``reference`` is ``bottleneck`` for SAN and RAN (CBAM and BAM
  take 2-D maps and are refused). At a site after layer l, SAN compares the layer's output Y_l with its input
  Y_{l-1} (the network input for layer 1) and RAN sees the output only; both work on N × C × T;
- SAN's smoothing conv over time has kernel 3: an LSTM has no conv kernel to copy, and 3 is the smallest
  window that smooths — the same size as SAN's extrema window and as a 1x1 conv layer's sites in the CNNs.
"""

from typing import Any

from torch import Tensor, nn

from san.attention import apply_attention
from san.placement import BOTTLENECK, FULL, AttentionPlan
from san.registry import register_model

LAYERS = 4
POOL_EVERY = 2
SMOOTHING_KERNEL = 3


class RecurrentUnit(nn.Module):
    """One LSTM layer followed by its attention site; N × T × F in, N × T × H out."""

    def __init__(self, in_features: int, hidden: int, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True)
        self.attn = attention

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.lstm(x)
        if self.attn is None:
            return y
        return apply_attention(self.attn, y.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)


class LSTM4(nn.Module):
    """Four ``hidden``-unit LSTM layers, a temporal average pooling after every two, a mean over time and a
    ``Linear(hidden, num_classes)`` head."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        attention: str = "none",
        placement: str = "bottleneck",
        attention_kwargs: dict[str, Any] | None = None,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        plan = AttentionPlan(attention, placement, attention_kwargs or {}, dims=1, model="lstm4")
        units = []
        features = in_chans
        for index in range(1, LAYERS + 1):
            tags = {FULL, BOTTLENECK} if index % POOL_EVERY == 0 else {FULL}
            units.append(RecurrentUnit(features, hidden, plan.at(tags, hidden, features, SMOOTHING_KERNEL)))
            features = hidden
        self.units = nn.ModuleList(units)
        self.pool = nn.AvgPool1d(2, 2, ceil_mode=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"lstm4 takes N×T×F sequences (batch, time, features), got shape {tuple(x.shape)}")
        for index, unit in enumerate(self.units, start=1):
            x = unit(x)
            if index % POOL_EVERY == 0:
                x = self.pool(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x.mean(dim=1))


@register_model(inputs="sequences")
def lstm4(
    num_classes: int,
    attention: str = "none",
    placement: str = "bottleneck",
    in_chans: int = 1,
    attention_kwargs: dict[str, Any] | None = None,
    hidden: int = 64,
    **kwargs: Any,
) -> LSTM4:
    if kwargs:
        names = ", ".join(repr(name) for name in kwargs)
        hint = " (a recurrent network has no stem)" if "stem" in kwargs else ""
        raise ValueError(
            f"lstm4 takes no argument {names}{hint}; it takes: in_chans, attention, placement, attention_kwargs, hidden"
        )
    return LSTM4(num_classes, in_chans, attention, placement, attention_kwargs, hidden)
