"""SAN: scale-space attention (Garg, Candan, Sapino, ICDE 2020, Section III-C, eqs 4–12).

For a unit with input ``y_prev`` (C' channels) and output ``y`` (C channels) the module computes

1. cross-layer channel alignment (CCA, eqs 6–7): ``ybar = mean_c(y_prev)``, broadcast to C channels. When a
   strided layer sits between the two (``y_prev`` is spatially larger), ``ybar`` is average-pooled to ``y``'s
   size — the paper compares same-size maps only, this is the natural extension;
2. the difference of convolutions (DoC, eq 8): ``dY = |y - ybar|``;
3. soft extrema (eqs 9–10): ``alpha = #{3x3 neighbours n : dY >= dY[n]} / 9`` (the centre counts itself,
   neighbours outside the map count as *not smaller*), ``Ye = alpha * dY``. alpha is a step function of dY
   and passes no gradient: gradients reach ``dY`` only through the product;
4. smoothing (eq 11): a trainable C→C conv ``smooth`` with the feature branch's kernel size, dilation 1 for
   SAN-c and > 1 for SAN-d. Eq 11 wraps it in an activation σ, yet eq 12's discussion has negative conv outputs
   saturate the sigmoid to 0, so σ is the identity by default (``smoothing_activation``);
5. the mask ``M = sigmoid(smoothed)`` (eq 12) and the output ``y * M`` (eq 4).

The ablation switches of Table IX each remove exactly one step: ``use_cca=False`` compares with ``y_prev``
itself (only defined when C' == C), ``use_abs=False`` keeps the signed difference, ``use_extrema=False`` uses
``dY`` as ``Ye``, ``use_smoothing=False`` applies the sigmoid to ``Ye`` directly.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from san.attention.base import AttentionModule, IncompatibleConfiguration, Tap
from san.attention.fused import extrema_count, san_mask

RECOMPUTE_MACS = 1536  # multiply-adds per output of the smoothing conv, up to which the fast path recomputes it
_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def soft_extrema_weight(doc: Tensor) -> Tensor:
    """alpha of eq 10, in (0, 1], as ``doc``'s dtype; carries no gradient."""
    return extrema_count(doc).to(doc.dtype) / 9


def channel_mean_aligned(y_prev: Tensor, size: tuple[int, int]) -> Tensor:
    """Eqs 6–7: the channel mean of ``y_prev`` (N×1×H×W, broadcast over channels), pooled to ``size``."""
    ybar = y_prev.mean(dim=1, keepdim=True)
    if tuple(ybar.shape[-2:]) != tuple(size):
        ybar = F.adaptive_avg_pool2d(ybar, size)
    return ybar


class SAN(AttentionModule):
    """Scale-space attention module; ``forward(y, y_prev)`` returns ``y * mask``.

    Args:
        channels: C, the channels of the unit's output ``y``.
        kernel_size: spatial size of the smoothing conv — the feature branch's kernel at this position.
        dilation: 1 for SAN-c, > 1 for SAN-d.
        use_cca / use_abs / use_extrema / use_smoothing: the paper's ablation switches (Table IX).
        smoothing_activation: σ of eq 11: ``identity`` (default), ``relu``, ``tanh`` or ``sigmoid``.
        smoothing_groups: 1 is the paper's dense C→C conv; C or ``"depthwise"`` makes it depthwise (beyond the
            paper: C× fewer FLOPs; ``"depthwise"`` suits model-wide settings, where C differs per position).
        prev_channels: C' of ``y_prev`` when known at build time, so ``use_cca=False`` with C' != C fails early.
    """

    takes_previous = True

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        use_abs: bool = True,
        use_cca: bool = True,
        use_extrema: bool = True,
        use_smoothing: bool = True,
        smoothing_activation: str = "identity",
        smoothing_groups: int | str = 1,
        prev_channels: int | None = None,
    ) -> None:
        super().__init__()
        if smoothing_activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown smoothing_activation {smoothing_activation!r}; choose one of: {', '.join(_ACTIVATIONS)}"
            )
        if smoothing_groups == "depthwise":
            smoothing_groups = channels
        if not isinstance(smoothing_groups, int) or smoothing_groups < 1 or channels % smoothing_groups:
            raise ValueError(
                f"smoothing_groups={smoothing_groups!r} must be 'depthwise' or a positive divisor of "
                f"channels={channels}"
            )
        self.channels = channels
        self.use_abs, self.use_cca, self.use_extrema, self.use_smoothing = use_abs, use_cca, use_extrema, use_smoothing
        if prev_channels is not None:
            self._check_alignment(prev_channels)
        if use_smoothing:
            self.smooth = nn.Conv2d(
                channels, channels, kernel_size, padding="same", dilation=dilation, groups=smoothing_groups
            )
            self.smooth_act = _ACTIVATIONS[smoothing_activation]()
        self.smoothing_activation = smoothing_activation
        # The fused path pads symmetrically: even kernels ("same" pads them unevenly) keep the stepwise path.
        self._fast_conv = (
            (dilation * (kernel_size - 1) // 2, dilation, smoothing_groups)
            if kernel_size % 2 or not use_smoothing
            else None
        )
        # The fast path's time/memory trade: a cheap smoothing conv (LeNet-size) is recomputed in backward rather
        # than its output kept; an expensive one (ResNet's 7x7 stem, wide stages) keeps its output.
        self.recompute_smoothing = channels // smoothing_groups * kernel_size**2 <= RECOMPUTE_MACS
        self.doc = Tap()
        self.extrema = Tap()
        self.smoothed = Tap()
        self.mask = Tap()

    def _check_alignment(self, prev_channels: int) -> None:
        if not self.use_cca and prev_channels != self.channels:
            raise IncompatibleConfiguration(
                f"use_cca=False needs equal channel counts, got C'={prev_channels} (previous) and "
                f"C={self.channels} (current); the paper leaves this case undefined (Table IX '-')"
            )

    def forward(self, y: Tensor, y_prev: Tensor) -> Tensor:
        size = y.shape[-2:]
        if self.use_cca:
            reference = channel_mean_aligned(y_prev, size)
        else:
            self._check_alignment(y_prev.shape[1])
            reference = y_prev if y_prev.shape[-2:] == size else F.adaptive_avg_pool2d(y_prev, size)
        # getattr: a SAN pickled before the fast path existed lacks its settings and keeps the stepwise path.
        fast_conv = getattr(self, "_fast_conv", None)
        if fast_conv is not None and self.use_fast_path():
            smooth = self.smooth if self.use_smoothing else None
            padding, dilation, groups = fast_conv
            return san_mask(
                y,
                reference,
                None if smooth is None else smooth.weight,
                None if smooth is None else smooth.bias,
                padding=padding,
                dilation=dilation,
                groups=groups,
                use_abs=self.use_abs,
                use_extrema=self.use_extrema,
                activation=self.smoothing_activation if self.use_smoothing else "identity",
                recompute_smoothing=self.recompute_smoothing,
            )
        doc = y - reference
        if self.use_abs:
            doc = doc.abs()
        doc = self.doc(doc)
        # The uint8 count is what autograd saves for the product: 1 byte a cell instead of a float alpha.
        weighted = self.extrema((doc * extrema_count(doc)).mul_(1 / 9) if self.use_extrema else doc)
        logits = self.smoothed(self.smooth_act(self.smooth(weighted))) if self.use_smoothing else weighted
        mask = self.mask(torch.sigmoid(logits))
        return y * mask

    def extra_repr(self) -> str:
        switches = {"cca": self.use_cca, "abs": self.use_abs, "extrema": self.use_extrema}
        return f"{self.channels}, " + ", ".join(f"use_{k}={v}" for k, v in switches.items())
