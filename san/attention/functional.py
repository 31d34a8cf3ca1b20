"""The attention modules' maths as plain functions of tensors, read top to bottom as the papers write them.

This is the reference formulation: the modules' stepwise path calls it, and every fast path (`san.kernels.ops`) is
tested against it. Learned layers come in as callables (``smooth``, ``mlp``, ``spatial``), so the same function
serves a module's own layers and any other weights. ``tap(name, map)`` sees each named intermediate map and returns
it (the modules pass their `Tap`s, which `san.masks` hooks); by default it is the identity.
"""

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Layer = Callable[[Tensor], Tensor]
TapFn = Callable[[str, Tensor], Tensor]


def untapped(_name: str, value: Tensor) -> Tensor:
    return value


# --- SAN (Garg, Candan, Sapino, ICDE 2020, Section III-C) -----------------------------------------------------------


def aligned(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """``x`` adaptive-average-pooled over its last ``len(size)`` axes to ``size`` (unchanged if already that size)."""
    if tuple(x.shape[x.dim() - len(size) :]) == tuple(size):
        return x
    return F.adaptive_avg_pool1d(x, size) if len(size) == 1 else F.adaptive_avg_pool2d(x, size)


def channel_mean_aligned(y_prev: Tensor, size: tuple[int, ...]) -> Tensor:
    """Eqs 6–7 (CCA): the channel mean of ``y_prev`` (N×1×H×W or N×1×T, broadcast over channels), pooled to ``size``."""
    return aligned(y_prev.mean(dim=1, keepdim=True), size)


def san_reference(y_prev: Tensor, size: tuple[int, ...], use_cca: bool = True) -> Tensor:
    """What eq 8 compares ``y`` with: the CCA map, or with ``use_cca=False`` ``y_prev`` itself (pooled to ``size``)."""
    return channel_mean_aligned(y_prev, size) if use_cca else aligned(y_prev, size)


# The neighbour offsets of the 3-wide window over the last 1 (sequences) or 2 (maps) axes.
_NEIGHBOUR_OFFSETS = {dims: [o for o in itertools.product((-1, 0, 1), repeat=dims) if any(o)] for dims in (1, 2)}


@torch.no_grad()
def extrema_count(doc: Tensor, dims: int = 2) -> Tensor:
    """Eq 10's numerator: how many cells of the 3-wide window over the last ``dims`` axes (3x3 on maps, 3 steps on
    sequences), centre included, are <= the centre, per channel; uint8 in 1..3**dims, carrying no gradient.

    A neighbour outside the map never counts — it is "not smaller": each comparison is made on the sub-region whose
    neighbour lies inside. Shifted views and a small integer counter keep this ~8x faster than ``F.unfold``.
    """
    sizes = doc.shape[doc.dim() - dims :]
    count = torch.ones_like(doc, dtype=torch.uint8)
    for offset in _NEIGHBOUR_OFFSETS[dims]:
        centre, neighbour = [...], [...]
        for size, step in zip(sizes, offset, strict=True):
            start, stop = max(0, -step), size - max(0, step)
            if start >= stop:  # the map is one cell wide on this axis: no neighbour inside it
                break
            centre.append(slice(start, stop))
            neighbour.append(slice(start + step, stop + step))
        else:
            inside, shifted = tuple(centre), tuple(neighbour)
            count[inside] += doc[inside] >= doc[shifted]
    return count


def soft_extrema_weight(doc: Tensor, dims: int = 2) -> Tensor:
    """alpha of eq 10, in (0, 1], as ``doc``'s dtype; carries no gradient."""
    return extrema_count(doc, dims).to(doc.dtype) / 3**dims


def san(
    y: Tensor,
    y_prev: Tensor,
    smooth: Layer | None,
    *,
    use_cca: bool = True,
    use_abs: bool = True,
    use_extrema: bool = True,
    dims: int = 2,
    tap: TapFn = untapped,
) -> Tensor:
    """SAN's output ``y * M`` for a unit's output ``y`` (C channels) and input ``y_prev`` (C'), eqs 4–12:

    1. cross-layer channel alignment (CCA, eqs 6–7): ``ybar = mean_c(y_prev)``, broadcast to C channels, average-pooled
       to ``y``'s size when a strided layer sits between the two (the paper compares same-size maps only);
    2. the difference of convolutions (DoC, eq 8): ``dY = |y - ybar|``;
    3. soft extrema (eqs 9–10): ``alpha = #{3x3 neighbours n : dY >= dY[n]} / 9`` (the centre counts itself,
       neighbours outside the map count as *not smaller*), ``Ye = alpha * dY``; alpha passes no gradient;
    4. smoothing (eq 11): ``smooth`` (σ∘conv, C→C, the feature branch's kernel size; dilation 1 for SAN-c, > 1 for
       SAN-d). Eq 12's discussion has negative conv outputs saturate the sigmoid to 0, so σ is the identity by default;
    5. the mask ``M = sigmoid(smoothed)`` (eq 12) and the output ``y * M`` (eq 4).

    Table IX's switches each remove one step: ``use_cca=False`` compares with ``y_prev`` itself (C' == C only),
    ``use_abs=False`` keeps the signed difference, ``use_extrema=False`` uses ``dY`` as ``Ye``, ``smooth=None``
    (``use_smoothing=False``) applies the sigmoid to ``Ye``. ``dims``: 2 for maps (N×C×H×W), 1 for sequences (N×C×T):
    the same steps with time as the one axis, a 3-step window (``alpha = count / 3``) and a ``Conv1d``.
    """
    reference = san_reference(y_prev, tuple(y.shape[2:]), use_cca)  # eqs 6–7
    doc = y - reference  # eq 8: the difference of convolutions ...
    doc = tap("doc", doc.abs() if use_abs else doc)  # ... as an absolute difference
    # eqs 9–10: alpha · dY; the uint8 count is what autograd keeps for the product, 1 byte a cell
    weighted = tap("extrema", doc * extrema_count(doc, dims) / 3**dims if use_extrema else doc)
    logits = tap("smoothed", smooth(weighted)) if smooth is not None else weighted  # eq 11
    mask = tap("mask", torch.sigmoid(logits))  # eq 12
    return y * mask  # eq 4


# --- CBAM (Woo et al., ECCV 2018) -----------------------------------------------------------------------------------


def cbam(x: Tensor, mlp: Layer, spatial: Layer, tap: TapFn = untapped) -> Tensor:
    """``F' = Mc(F) ⊗ F``, ``F'' = Ms(F') ⊗ F'`` with ``Mc = σ(MLP(AvgPool F) + MLP(MaxPool F))`` (a shared MLP
    over N×C×1×1 descriptors) and ``Ms = σ(spatial([MaxPool_c F'; AvgPool_c F']))`` (``spatial``: conv + BN)."""
    channel_mask = tap("channel_mask", torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), True))))
    x = x * channel_mask
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    return x * tap("mask", torch.sigmoid(spatial(pooled)))


# --- BAM (Park et al., BMVC 2018) -----------------------------------------------------------------------------------


def bam(x: Tensor, channel: Layer, spatial: Layer, combine: str = "sum", tap: TapFn = untapped) -> Tensor:
    """``F' = F + F ⊗ M(F)`` with ``M = σ(Mc + Ms)``: ``Mc = channel(AvgPool F)`` (N×C logits, an MLP with BN) and
    ``Ms = spatial(F)`` (N×1×H×W logits, dilated convs). ``combine="product"`` is the authors' code: ``σ(Mc · Ms)``."""
    channel_logits = channel(x.mean((2, 3)))[:, :, None, None]
    spatial_logits = spatial(x)
    logits = channel_logits + spatial_logits if combine == "sum" else channel_logits * spatial_logits
    return x * (1 + tap("mask", torch.sigmoid(logits)))
