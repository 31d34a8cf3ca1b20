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

Sequences (``dims=1``, set by recurrent backbones such as ``lstm4``): the paper applies SAN to LSTM-4
(Section IV-B4, Tables VI–VII) without restating the steps; ours are the same steps with time as the one
"spatial" axis of an N×C×T map (C = features, T = time steps): CCA is the mean over features of ``y_prev``
(adaptive-average-pooled to ``y``'s length if that differs), DoC as above, the soft extrema window is 3 time
steps (``alpha = count / 3``, the same tie and border rules: a step outside the sequence is not smaller), and
the smoothing conv is a C→C ``Conv1d`` over time. The fused fast path is written for maps; sequences take the
stepwise path.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from san.attention.base import AttentionModule, IncompatibleConfiguration, Tap
from san.attention.fused import extrema_count, san_mask

RECOMPUTE_MACS = 1536  # multiply-adds per output of the smoothing conv, up to which the fast path recomputes it
_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_CONVS: dict[int, type[nn.Conv1d | nn.Conv2d]] = {1: nn.Conv1d, 2: nn.Conv2d}


def soft_extrema_weight(doc: Tensor, dims: int = 2) -> Tensor:
    """alpha of eq 10, in (0, 1], as ``doc``'s dtype; carries no gradient. ``dims``: 2 for maps, 1 for sequences."""
    return extrema_count(doc, dims).to(doc.dtype) / 3**dims


def aligned(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """``x`` adaptive-average-pooled over its last ``len(size)`` axes to ``size`` (unchanged if already that size)."""
    if tuple(x.shape[x.dim() - len(size) :]) == tuple(size):
        return x
    return F.adaptive_avg_pool1d(x, size) if len(size) == 1 else F.adaptive_avg_pool2d(x, size)


def channel_mean_aligned(y_prev: Tensor, size: tuple[int, ...]) -> Tensor:
    """Eqs 6–7: the channel mean of ``y_prev`` (N×1×H×W or N×1×T, broadcast over channels), pooled to ``size``."""
    return aligned(y_prev.mean(dim=1, keepdim=True), size)


class SAN(AttentionModule):
    """Scale-space attention module; ``forward(y, y_prev)`` returns ``y * mask``.

    Args:
        channels: C, the channels of the unit's output ``y``.
        kernel_size: size (per axis) of the smoothing conv — the feature branch's kernel at this position.
        dilation: 1 for SAN-c, > 1 for SAN-d.
        use_cca / use_abs / use_extrema / use_smoothing: the paper's ablation switches (Table IX).
        smoothing_activation: σ of eq 11: ``identity`` (default), ``relu``, ``tanh`` or ``sigmoid``.
        smoothing_groups: 1 is the paper's dense C→C conv; C or ``"depthwise"`` makes it depthwise (beyond the
            paper: C× fewer FLOPs; ``"depthwise"`` suits model-wide settings, where C differs per position).
        prev_channels: C' of ``y_prev`` when known at build time, so ``use_cca=False`` with C' != C fails early.
        dims: 2 for feature maps (N×C×H×W), 1 for sequences (N×C×T); set by the backbone at each position.
    """

    takes_previous = True
    supported_dims = (1, 2)

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
        dims: int = 2,
    ) -> None:
        super().__init__()
        if dims not in self.supported_dims:
            raise ValueError(f"dims={dims!r}: SAN works on sequences (1) or feature maps (2)")
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
        self.dims = dims
        self.use_abs, self.use_cca, self.use_extrema, self.use_smoothing = use_abs, use_cca, use_extrema, use_smoothing
        if prev_channels is not None:
            self._check_alignment(prev_channels)
        if use_smoothing:
            self.smooth = _CONVS[dims](
                channels, channels, kernel_size, padding="same", dilation=dilation, groups=smoothing_groups
            )
            self.smooth_act = _ACTIVATIONS[smoothing_activation]()
        self.smoothing_activation = smoothing_activation
        # The fused path pads symmetrically: even kernels ("same" pads them unevenly) keep the stepwise path, and so
        # do sequences, which the fused path is not written for (the stepwise path is cheap on them).
        self._fast_conv = (
            (dilation * (kernel_size - 1) // 2, dilation, smoothing_groups)
            if dims == 2 and (kernel_size % 2 or not use_smoothing)
            else None
        )
        # The fast path's time/memory trade: a cheap smoothing conv (LeNet-size) is recomputed in backward rather
        # than its output kept; an expensive one (ResNet's 7x7 stem, wide stages) keeps its output.
        self.recompute_smoothing = channels // smoothing_groups * kernel_size**dims <= RECOMPUTE_MACS
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
        dims = getattr(self, "dims", 2)  # a SAN pickled before sequences existed is 2-D
        if y.dim() != dims + 2 or y_prev.dim() != dims + 2:
            layout = "N×C×T" if dims == 1 else "N×C×H×W"
            raise ValueError(
                f"SAN(dims={dims}) takes {layout} inputs, got y {tuple(y.shape)} and y_prev {tuple(y_prev.shape)}"
            )
        size = tuple(y.shape[2:])
        if self.use_cca:
            reference = channel_mean_aligned(y_prev, size)
        else:
            self._check_alignment(y_prev.shape[1])
            reference = aligned(y_prev, size)
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
        weighted = self.extrema((doc * extrema_count(doc, dims)).mul_(1 / 3**dims) if self.use_extrema else doc)
        logits = self.smoothed(self.smooth_act(self.smooth(weighted))) if self.use_smoothing else weighted
        mask = self.mask(torch.sigmoid(logits))
        return y * mask

    def extra_repr(self) -> str:
        switches = {"cca": self.use_cca, "abs": self.use_abs, "extrema": self.use_extrema}
        dims = "" if getattr(self, "dims", 2) == 2 else ", dims=1"
        return f"{self.channels}{dims}, " + ", ".join(f"use_{k}={v}" for k, v in switches.items())
