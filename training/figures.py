"""Figures of a study (a grid of training runs comparing attention modules), each written as one PNG.

Figures are built with the object API (`Figure` + the Agg canvas), never through pyplot: pyplot keeps every figure
in a process-wide registry and is not thread-safe, while these run inside a long-lived service. A figure that
pyplot never registered needs no `plt.close`; it is freed with its last reference once saved.

Each `plot_*` function has a `*_figure` twin that builds the `Figure` without writing it, for tests and notebooks.
"""

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import MaxNLocator, PercentFormatter

DPI = 150
MASK_CMAP = "viridis"

SCALE_SPACE_STAGES: dict[str, str] = {
    "previous": r"previous layer $Y_{l-1}$",
    "current": r"current layer $Y_l$",
    "doc": r"DoC $|Y_l - \bar{Y}_{l-1}|$",
    "extrema": "weighted extrema",
    "smoothed": "smoothed",
    "mask": r"mask $M$",
}


# ---------------------------------------------------------------------------------------------------- saving


def save_png(figure: Figure, path: Path) -> None:
    """Write `figure` to `path` so that readers only ever see a complete PNG (temp file + `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            FigureCanvasAgg(figure)
            figure.savefig(stream, format="png", dpi=DPI)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; the service and people read these figures
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- mosaics


def _grid_shape(channels: int) -> tuple[int, int]:
    """Rows × columns for `channels` tiles: near-square, but an exact fit up to twice as wide (8 → 2×4, not a
    3×3 with a hole) since empty tiles read as missing channels."""
    square = math.ceil(math.sqrt(channels))
    for columns in range(square, channels + 1):
        rows = math.ceil(channels / columns)
        if columns > 2 * rows:
            break
        if rows * columns == channels:
            return rows, columns
    return math.ceil(channels / square), square


def _normalise_channels(channels: np.ndarray) -> np.ndarray:
    low = channels.min(axis=(1, 2), keepdims=True)
    span = channels.max(axis=(1, 2), keepdims=True) - low
    flat = span <= 0
    return np.where(flat, 0.0, (channels - low) / np.where(flat, 1.0, span))


def channel_grid(array: np.ndarray, max_channels: int, *, normalise: bool = True, fill: float = 1.0) -> np.ndarray:
    """One 2-D mosaic of the first `max_channels` channels of a C×H×W array (or one H×W map), tiled row by row
    in a near-square grid with 1-px separators of value `fill` between tiles; unused tiles are `fill` too.

    With `normalise` every channel is min–max scaled to 0..1 on its own (a constant channel becomes 0, not NaN);
    without it the values are kept, e.g. for masks drawn on a fixed 0..1 scale.
    """
    if max_channels < 1:
        raise ValueError(f"max_channels must be at least 1, got {max_channels}")
    channels = np.asarray(array, dtype=np.float32)
    if channels.ndim == 2:
        channels = channels[np.newaxis]
    if channels.ndim != 3:
        raise ValueError(f"channel_grid expects a C×H×W array, got shape {channels.shape}")
    channels = channels[:max_channels]
    if normalise:
        channels = _normalise_channels(channels)
    count, height, width = channels.shape
    rows, columns = _grid_shape(count)
    mosaic = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), fill, dtype=np.float32)
    for index, channel in enumerate(channels):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        mosaic[top : top + height, left : left + width] = channel
    return mosaic


def sequence_map(array: np.ndarray, max_channels: int, *, normalise: bool = True) -> np.ndarray:
    """The first `max_channels` rows of a C×T sequence map (channels × time steps) as one 2-D picture, each row
    min–max scaled to 0..1 on its own with `normalise` (a constant row becomes 0)."""
    if max_channels < 1:
        raise ValueError(f"max_channels must be at least 1, got {max_channels}")
    rows = np.asarray(array, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"sequence_map expects a C×T array, got shape {rows.shape}")
    rows = rows[:max_channels]
    return _normalise_channels(rows[:, np.newaxis])[:, 0] if normalise else rows


def picture(array: np.ndarray, max_channels: int, *, normalise: bool = True, fill: float = 1.0) -> np.ndarray:
    """One sample's map as a picture: a mosaic of a C×H×W image map (`channel_grid`), or a C×T sequence map as
    channels × time (`sequence_map`)."""
    if np.ndim(array) == 2:
        return sequence_map(array, max_channels, normalise=normalise)
    return channel_grid(array, max_channels, normalise=normalise, fill=fill)


def _bare(axes: Axes) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


# ---------------------------------------------------------------------------------------------------- curves


def _seed_band(seeds: Sequence[Sequence[float]]) -> np.ndarray | None:
    """Seeds × epochs over the epochs every seed has reached; seeds without any epoch yet are left out."""
    started = [np.asarray(seed, dtype=np.float64) for seed in seeds if len(seed) > 0]
    if not started:
        return None
    epochs = min(len(seed) for seed in started)
    return np.stack([seed[:epochs] for seed in started])


def _palette(count: int) -> Colormap:
    return colormaps["tab10" if count <= 10 else "tab20"]


def accuracy_curves_figure(curves: Mapping[str, Sequence[Sequence[float]]], ylabel: str = "val top-1",
                           percent: bool = True) -> Figure:  # fmt: skip
    """Mean over seeds per epoch, with a min–max band where there are several seeds; y in percent (fractions
    given) unless ``percent`` is false (an error, a similarity)."""
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    palette = _palette(len(curves))
    for index, (label, seeds) in enumerate(curves.items()):
        values = _seed_band(seeds)
        if values is None:
            continue
        epochs = np.arange(1, values.shape[1] + 1)
        colour = palette(index % palette.N)
        axes.plot(
            epochs,
            values.mean(axis=0),
            color=colour,
            label=label,
            linewidth=1.8,
            marker="." if len(epochs) < 30 else None,
        )
        if len(values) > 1:
            axes.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2, linewidth=0)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    if percent:
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if axes.lines:
        figure.legend(loc="outside right upper", frameon=False)
    else:
        axes.text(0.5, 0.5, "no completed epochs yet", transform=axes.transAxes, ha="center", va="center")
    return figure


def plot_accuracy_curves(
    curves: Mapping[str, Sequence[Sequence[float]]], path: Path, ylabel: str = "val top-1", percent: bool = True
) -> None:
    """Per cell label, the per-epoch mean over seeds (fractions when ``percent``) with a min–max band over seeds,
    as a PNG."""
    save_png(accuracy_curves_figure(curves, ylabel, percent), path)


# ---------------------------------------------------------------------------------------------------- epoch time


def _format_seconds(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.2f} s"


def _bar_caption(mean: float, baseline_mean: float | None) -> str:
    if baseline_mean is None or baseline_mean <= 0:
        return _format_seconds(mean)
    return f"{_format_seconds(mean)}\n×{mean / baseline_mean:.2f}"


def epoch_seconds_figure(seconds: Mapping[str, Sequence[float]], baseline: str | None = None) -> Figure:
    """A bar per label with data: mean seconds per epoch, sample-std error bar (n ≥ 2), the value above the bar
    and, with a known `baseline`, the ratio to the baseline's mean under it."""
    timed = {label: np.asarray(values, dtype=np.float64) for label, values in seconds.items() if len(values) > 0}
    labels = list(timed)
    means = np.array([values.mean() for values in timed.values()])
    errors = np.array([values.std(ddof=1) if len(values) > 1 else 0.0 for values in timed.values()])
    baseline_mean = float(timed[baseline].mean()) if baseline in timed else None

    figure = Figure(figsize=(max(4.5, 1.0 * len(labels) + 2.0), 4.5), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(labels))
    colours = ["0.45" if label == baseline else "tab:blue" for label in labels]
    axes.bar(positions, means, color=colours, width=0.65)
    has_error = errors > 0
    axes.errorbar(positions[has_error], means[has_error], yerr=errors[has_error], fmt="none", ecolor="black", capsize=4)
    for position, mean, error in zip(positions, means, errors, strict=True):
        axes.annotate(_bar_caption(float(mean), baseline_mean), (position, mean + error), xytext=(0, 3),
                      textcoords="offset points", ha="center", va="bottom", fontsize=9)  # fmt: skip
    rotate = max((len(label) for label in labels), default=0) > 9  # wider than its ~1 inch slot
    axes.set_xticks(positions, labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    axes.set_ylabel("seconds per epoch")
    axes.set_ylim(0, float((means + errors).max()) * 1.3 if labels else 1.0)
    axes.set_title("training time per epoch" + (f" (× = relative to {baseline})" if baseline_mean else ""))
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    return figure


def plot_epoch_seconds(seconds: Mapping[str, Sequence[float]], path: Path, baseline: str | None = None) -> None:
    """The paper's Fig. 9/10 — training time per module — as a PNG (see `epoch_seconds_figure`)."""
    save_png(epoch_seconds_figure(seconds, baseline), path)


# ---------------------------------------------------------------------------------------------------- Fig. 4


def _present_stages(maps: Mapping[str, np.ndarray]) -> list[str]:
    stages = [stage for stage in SCALE_SPACE_STAGES if stage in maps]
    if not stages:
        raise ValueError(f"no known scale-space stage in maps (keys {sorted(maps)}); expected some of "
                         f"{list(SCALE_SPACE_STAGES)}")  # fmt: skip
    return stages


def _check_images(name: str, array: np.ndarray, image: int) -> None:
    if len(array.shape) not in (3, 4):
        raise ValueError(f"{name!r} must be shaped [K images, C, H, W] or [K sequences, C, T], got shape "
                         f"{tuple(array.shape)}")  # fmt: skip
    if not 0 <= image < array.shape[0]:
        raise ValueError(f"image index {image} out of range for {name!r} holding {array.shape[0]} images")


def _draw_stage(panel: SubFigure, stage: str, channels: np.ndarray, max_channels: int) -> None:
    axes = panel.add_subplot()
    sequence = channels.ndim == 2
    axes.imshow(picture(channels, max_channels), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest",
                aspect="auto" if sequence else "equal")  # fmt: skip
    _bare(axes)
    panel.suptitle(SCALE_SPACE_STAGES[stage], fontsize=11)
    shown = f"{min(max_channels, len(channels))} of {len(channels)} channels"
    axes.set_xlabel(f"{shown} (rows) × {channels.shape[1]} steps" if sequence else shown, fontsize=8)


def scale_space_figure(maps: Mapping[str, np.ndarray], image: int = 0, max_channels: int = 16,
                       title: str = "") -> tuple[Figure, list[str]]:  # fmt: skip
    """The paper's Fig. 4 for one SAN module: one subfigure per present stage, in `SCALE_SPACE_STAGES` order,
    each a mosaic of image `image`'s first `max_channels` channels. Returns the figure and the stages drawn."""
    stages = _present_stages(maps)
    for stage in stages:
        _check_images(stage, maps[stage], image)
    columns = min(3, len(stages))
    rows = math.ceil(len(stages) / columns)
    figure = Figure(figsize=(2.9 * columns, 3.1 * rows + (0.4 if title else 0.0)), layout="constrained")
    grid = figure.add_gridspec(rows, columns)
    for index, stage in enumerate(stages):
        panel = figure.add_subfigure(grid[index // columns, index % columns])
        _draw_stage(panel, stage, np.asarray(maps[stage][image], dtype=np.float32), max_channels)
    if title:
        figure.suptitle(title, fontsize=13)
    return figure, stages


def plot_scale_space_stages(maps: Mapping[str, np.ndarray], path: Path, image: int = 0, max_channels: int = 16,
                            title: str = "") -> list[str]:  # fmt: skip
    """The paper's Fig. 4 as a PNG (see `scale_space_figure`); returns the stage keys drawn, in order."""
    figure, stages = scale_space_figure(maps, image, max_channels, title)
    save_png(figure, path)
    return stages


# ---------------------------------------------------------------------------------------------------- Fig. 8


def _input_images(masks: Mapping[str, Mapping[str, np.ndarray]]) -> np.ndarray | None:
    for maps in masks.values():
        if "image" in maps:
            images = maps["image"]
            if len(images.shape) == 3:  # sequences: K × T steps × F features
                return images
            if len(images.shape) != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"'image' must be shaped [K, 1 or 3, H, W], got shape {tuple(images.shape)}")
            return images
    return None


def _displayable(image: np.ndarray) -> np.ndarray:
    """1×H×W → H×W, 3×H×W → H×W×3; min–max over the whole image so colours keep their balance. A T×F sequence
    → features × time, each feature scaled on its own."""
    if np.ndim(image) == 2:
        return sequence_map(np.asarray(image).T, len(image[0]))
    pixels = np.asarray(image, dtype=np.float32)
    low, span = pixels.min(), pixels.max() - pixels.min()
    pixels = (pixels - low) / span if span > 0 else np.zeros_like(pixels)
    return pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)


def _mask_rows(masks: Mapping[str, Mapping[str, np.ndarray]], inputs: np.ndarray | None, images: int) -> int:
    counts = [maps["mask"].shape[0] for maps in masks.values()]
    if inputs is not None:
        counts.append(inputs.shape[0])
    return min(images, *counts)


def _check_masks(masks: Mapping[str, Mapping[str, np.ndarray]], images: int) -> None:
    if not masks:
        raise ValueError("no modules to compare: masks is empty")
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    for label, maps in masks.items():
        if "mask" not in maps:
            raise ValueError(f"module {label!r} has no 'mask' among its maps ({sorted(maps)})")
        if len(maps["mask"].shape) not in (3, 4):
            raise ValueError(f"{label!r} mask must be shaped [K, C, H, W] or [K, C, T], got shape "
                             f"{tuple(maps['mask'].shape)}")  # fmt: skip


def mask_comparison_figure(masks: Mapping[str, Mapping[str, np.ndarray]], images: int = 4,
                           max_channels: int = 8) -> tuple[Figure, list[str]]:  # fmt: skip
    """The paper's Fig. 8: a row per input image, the image first (if any module carries "image"), then each
    module's mask mosaic on one fixed 0..1 colour scale with a shared colorbar. Returns the figure and labels."""
    _check_masks(masks, images)
    inputs = _input_images(masks)
    labels = list(masks)
    rows = _mask_rows(masks, inputs, images)
    columns = len(labels) + (inputs is not None)
    figure = Figure(figsize=(1.9 * columns + 1.0, 1.9 * rows + 0.5), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    cmap = colormaps[MASK_CMAP].with_extremes(bad="white")  # NaN separators between channel tiles show as gaps
    shown = None
    for row in range(rows):
        panels = list(grid[row])
        if inputs is not None:
            shown_input = _displayable(inputs[row])
            panels.pop(0).imshow(shown_input, cmap="gray" if shown_input.ndim == 2 else None,
                                 interpolation="nearest", aspect="auto" if inputs.ndim == 3 else "equal")  # fmt: skip
        for axes, label in zip(panels, labels, strict=True):
            mask = masks[label]["mask"][row]
            mosaic = picture(mask, max_channels, normalise=False, fill=np.nan)
            shown = axes.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest",
                                aspect="auto" if mask.ndim == 2 else "equal")  # fmt: skip
    for axes in grid.flat:
        _bare(axes)
        axes.set_anchor("N")  # mosaics of other shapes then hang from one line under the column titles
    titles = (["input"] if inputs is not None else []) + labels
    for axes, column_title in zip(grid[0], titles, strict=True):
        axes.set_title(column_title, fontsize=11)
    for row in range(rows):
        grid[row, 0].set_ylabel(f"{'series' if inputs is not None and inputs.ndim == 3 else 'image'} {row}", fontsize=9)
    figure.colorbar(shown, ax=grid, shrink=0.8, pad=0.02, panchor=False, label="mask value")  # keep "N"
    return figure, labels


def plot_mask_comparison(masks: Mapping[str, Mapping[str, np.ndarray]], path: Path, images: int = 4,
                         max_channels: int = 8) -> list[str]:  # fmt: skip
    """The paper's Fig. 8 as a PNG (see `mask_comparison_figure`); returns the module labels drawn, in order."""
    figure, labels = mask_comparison_figure(masks, images, max_channels)
    save_png(figure, path)
    return labels
