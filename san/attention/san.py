"""SAN: scale-space attention (Garg, Candan, Sapino, ICDE 2020, Section III-C, eqs 4–12): ``y * M`` with M from the
difference between a unit's output and its channel-aligned input; the steps and Table IX's ablation switches are
`san.attention.functional.san`'s. Sequences (``dims=1``, LSTM-4 of Section IV-B4) run stepwise.
"""

from torch import Tensor, nn

from san.attention import functional
from san.attention.base import AttentionModule, IncompatibleConfiguration, Tap
from san.kernels import san_op

RECOMPUTE_MACS = 1536  # multiply-adds per output of the smoothing conv, up to which the fast path recomputes it
_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_CONVS: dict[int, type[nn.Conv1d | nn.Conv2d]] = {1: nn.Conv1d, 2: nn.Conv2d}


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
        groups = channels if smoothing_groups == "depthwise" else smoothing_groups
        if not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(
                f"smoothing_groups={smoothing_groups!r} must be 'depthwise' or a positive divisor of "
                f"channels={channels}"
            )
        self.channels, self.dims, self.smoothing_activation = channels, dims, smoothing_activation
        self.use_abs, self.use_cca, self.use_extrema, self.use_smoothing = use_abs, use_cca, use_extrema, use_smoothing
        if prev_channels is not None:
            self._check_alignment(prev_channels)
        if use_smoothing:
            self.smooth = _CONVS[dims](
                channels, channels, kernel_size, padding="same", dilation=dilation, groups=groups
            )
            self.smooth_act = _ACTIVATIONS[smoothing_activation]()
        # The fused op pads symmetrically: even kernels ("same" pads them unevenly) and sequences run stepwise.
        self.fusable = dims == 2 and (kernel_size % 2 == 1 or not use_smoothing)
        self.conv_settings = (dilation * (kernel_size - 1) // 2, dilation, groups)
        # The fused op's time/memory trade: a cheap smoothing conv (LeNet-size) is recomputed in backward rather
        # than its output kept; an expensive one (ResNet's 7x7 stem, wide stages) keeps its output.
        self.recompute_smoothing = channels // groups * kernel_size**dims <= RECOMPUTE_MACS
        self.doc, self.extrema, self.smoothed, self.mask = Tap(), Tap(), Tap(), Tap()

    def _check_alignment(self, prev_channels: int) -> None:
        if not self.use_cca and prev_channels != self.channels:
            raise IncompatibleConfiguration(
                f"use_cca=False needs equal channel counts, got C'={prev_channels} (previous) and "
                f"C={self.channels} (current); the paper leaves this case undefined (Table IX '-')"
            )

    def forward(self, y: Tensor, y_prev: Tensor) -> Tensor:
        if y.dim() != self.dims + 2 or y_prev.dim() != self.dims + 2:
            layout = "N×C×T" if self.dims == 1 else "N×C×H×W"
            raise ValueError(
                f"SAN(dims={self.dims}) takes {layout} inputs, got y {tuple(y.shape)} and y_prev {tuple(y_prev.shape)}"
            )
        if not self.use_cca:
            self._check_alignment(y_prev.shape[1])
        if not (self.fusable and self.fast_path()):
            smooth = (lambda x: self.smooth_act(self.smooth(x))) if self.use_smoothing else None
            return functional.san(
                y,
                y_prev,
                smooth,
                use_cca=self.use_cca,
                use_abs=self.use_abs,
                use_extrema=self.use_extrema,
                dims=self.dims,
                tap=self.tap,
            )
        reference = functional.san_reference(y_prev, tuple(y.shape[2:]), self.use_cca)
        weight, bias = (self.smooth.weight, self.smooth.bias) if self.use_smoothing else (None, None)
        activation = self.smoothing_activation if self.use_smoothing else "identity"
        settings = (*self.conv_settings, self.use_abs, self.use_extrema, activation, not self.recompute_smoothing, None)
        return san_op.call((y, reference, weight, bias), settings)[0]

    def extra_repr(self) -> str:
        switches = {"cca": self.use_cca, "abs": self.use_abs, "extrema": self.use_extrema}
        dims = "" if self.dims == 2 else ", dims=1"
        return f"{self.channels}{dims}, " + ", ".join(f"use_{k}={v}" for k, v in switches.items())
