"""training.figures: the study's PNGs (curves, epoch time, Fig. 4 stages, Fig. 8 masks) from synthetic maps."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from PIL import Image

from training import figures
from training.figures import (
    SCALE_SPACE_STAGES,
    accuracy_curves_figure,
    channel_grid,
    epoch_seconds_figure,
    mask_comparison_figure,
    plot_accuracy_curves,
    plot_epoch_seconds,
    plot_mask_comparison,
    plot_scale_space_stages,
    scale_space_figure,
)

ALL_STAGES = ["previous", "current", "doc", "extrema", "smoothed", "mask"]


def assert_only_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size[0] >= min_size[0] and picture.size[1] >= min_size[1]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert plt.get_fignums() == []  # nothing registered with pyplot, so nothing left open


def stage_maps(rng: np.random.Generator, stages: list[str], images: int = 3) -> dict[str, np.ndarray]:
    maps = {stage: rng.standard_normal((images, 32, 8, 8)).astype(np.float16) for stage in stages}
    if "previous" in maps:
        maps["previous"] = rng.standard_normal((images, 16, 16, 16)).astype(np.float32)
    if "mask" in maps:
        maps["mask"] = 1 / (1 + np.exp(-maps["mask"].astype(np.float32)))
    return maps


# ---------------------------------------------------------------------------------------------------- channel_grid


def test_channel_grid_tiles_normalised_channels_with_one_pixel_separators():
    rng = np.random.default_rng(0)
    array = rng.standard_normal((20, 8, 8)).astype(np.float16) * 5 + 3
    mosaic = channel_grid(array, 16)
    assert mosaic.shape == (4 * 8 + 3, 4 * 8 + 3)
    first, last = mosaic[:8, :8], mosaic[27:, 27:]
    expected = (array[0] - array[0].min()) / (array[0].max() - array[0].min())
    np.testing.assert_allclose(first, expected.astype(np.float32), atol=2e-3)
    assert first.min() == 0.0 and first.max() == pytest.approx(1.0)
    assert last.min() == 0.0 and last.max() == pytest.approx(1.0)
    assert (mosaic[8, :] == 1.0).all() and (mosaic[:, 8] == 1.0).all()  # separators


def test_channel_grid_constant_channel_is_zero_not_nan():
    array = np.stack([np.full((5, 7), 3.0), np.arange(35.0).reshape(5, 7)])
    mosaic = channel_grid(array, 16)
    assert mosaic.shape == (5, 2 * 7 + 1)
    assert not np.isnan(mosaic).any()
    assert (mosaic[:, :7] == 0.0).all()
    assert mosaic[:, 8:].max() == 1.0


def test_channel_grid_uses_fewer_cells_for_fewer_channels_and_keeps_values_unnormalised():
    array = np.random.default_rng(1).uniform(0.2, 0.6, size=(6, 4, 5))
    mosaic = channel_grid(array, 8, normalise=False, fill=np.nan)
    assert mosaic.shape == (2 * 4 + 1, 3 * 5 + 2)  # 6 channels: 2 rows of 3
    np.testing.assert_allclose(mosaic[5:, 12:], array[5], rtol=1e-6)
    assert np.isnan(mosaic[4, :]).all()
    assert channel_grid(array[0], 8).shape == (4, 5)  # one H×W map is one tile
    eight = np.ones((8, 4, 5))
    assert channel_grid(eight, 8).shape == (2 * 4 + 1, 4 * 5 + 3)  # 2×4 exactly, not 3×3 with a hole
    assert channel_grid(np.ones((5, 4, 5)), 8).shape == (2 * 4 + 1, 3 * 5 + 2)  # no exact fit: 2×3
    with pytest.raises(ValueError, match="max_channels"):
        channel_grid(array, 0)


# ---------------------------------------------------------------------------------------------------- curves


def test_accuracy_curves_mean_over_common_epochs_with_band_only_for_several_seeds():
    curves = {
        "SAN-d · bottleneck": [[0.1, 0.3, 0.5, 0.6], [0.2, 0.4, 0.6], [0.3, 0.5, 0.7, 0.8, 0.9]],
        "CBAM · full": [[0.15, 0.35]],
        "not started": [[]],
    }
    figure = accuracy_curves_figure(curves)
    axes = figure.axes[0]
    san, cbam = axes.lines
    np.testing.assert_array_equal(san.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(san.get_ydata(), [0.2, 0.4, 0.6])
    np.testing.assert_array_equal(cbam.get_xdata(), [1, 2])
    bands = [c for c in axes.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # the single-seed cell has no band
    band_y = bands[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() == pytest.approx(0.1) and band_y.max() == pytest.approx(0.7)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["SAN-d · bottleneck", "CBAM · full"]
    assert isinstance(axes.yaxis.get_major_formatter(), PercentFormatter)
    assert axes.get_ylabel() == "val top-1"


def test_plot_accuracy_curves_writes_png(tmp_path):
    path = tmp_path / "study" / "curves.png"
    curves = {"SAN-c": [[0.1, 0.2, 0.4], [0.1, 0.25]], "BAM": [[0.1, 0.3, 0.35]]}
    assert plot_accuracy_curves(curves, path, ylabel="train top-1") is None
    assert_only_png(path)


# ---------------------------------------------------------------------------------------------------- epoch time


def test_epoch_seconds_bars_errors_and_ratios_to_baseline():
    seconds = {"none": [10.0, 12.0, 11.0], "SAN-d": [15.0, 17.0], "CBAM": [13.0]}
    figure = epoch_seconds_figure(seconds, baseline="none")
    axes = figure.axes[0]
    np.testing.assert_allclose([bar.get_height() for bar in axes.patches], [11.0, 16.0, 13.0])
    texts = [t.get_text() for t in axes.texts]
    assert texts == ["11.0 s\n×1.00", "16.0 s\n×1.45", "13.0 s\n×1.18"]
    error_segments = axes.containers[1].lines[2][0].get_segments()
    assert len(error_segments) == 2  # n=1 has no error bar
    np.testing.assert_allclose(error_segments[1][:, 1], [16.0 - np.sqrt(2), 16.0 + np.sqrt(2)])
    assert [t.get_text() for t in axes.get_xticklabels()] == ["none", "SAN-d", "CBAM"]


def test_epoch_seconds_without_known_baseline_writes_values_only(tmp_path):
    figure = epoch_seconds_figure({"SAN-c": [3.0, 5.0], "BAM": [2.5]}, baseline="missing")
    assert [t.get_text() for t in figure.axes[0].texts] == ["4.00 s", "2.50 s"]
    path = tmp_path / "epoch_seconds.png"
    plot_epoch_seconds({"SAN-c": [3.0, 5.0], "BAM": [2.5]}, path, baseline="BAM")
    assert_only_png(path)


# ---------------------------------------------------------------------------------------------------- Fig. 4


def test_scale_space_figure_draws_all_six_stages_in_order_one_subfigure_each():
    maps = stage_maps(np.random.default_rng(2), list(reversed(ALL_STAGES)))
    maps["channel_mask"] = np.zeros((3, 32, 1, 1))  # unknown keys are ignored
    figure, stages = scale_space_figure(maps, image=2, title="features.1.attn")
    assert stages == ALL_STAGES
    assert len(figure.subfigs) == 6
    assert [panel._suptitle.get_text() for panel in figure.subfigs] == [SCALE_SPACE_STAGES[s] for s in ALL_STAGES]
    shown = [panel.axes[0].images[0].get_array() for panel in figure.subfigs]
    assert shown[0].shape == (4 * 16 + 3, 4 * 16 + 3)  # previous: 16 channels of 16×16
    assert shown[1].shape == (4 * 8 + 3, 4 * 8 + 3)  # 16 of 32 channels of 8×8
    expected = channel_grid(maps["doc"][2], 16)
    np.testing.assert_allclose(shown[2], expected)


def test_plot_scale_space_stages_ablation_draws_four_panels(tmp_path):
    maps = stage_maps(np.random.default_rng(3), ["previous", "current", "doc", "mask"])
    figure, stages = scale_space_figure(maps, max_channels=4)
    assert stages == ["previous", "current", "doc", "mask"] and len(figure.subfigs) == 4
    assert figure.subfigs[0].axes[0].images[0].get_array().shape == (2 * 16 + 1, 2 * 16 + 1)
    path = tmp_path / "fig4" / "stages.png"
    assert plot_scale_space_stages(maps, path, image=1, max_channels=4) == stages
    assert_only_png(path)


def test_plot_scale_space_stages_rejects_bad_image_and_no_stage(tmp_path):
    maps = stage_maps(np.random.default_rng(4), ALL_STAGES, images=2)
    with pytest.raises(ValueError, match="image index 2"):
        plot_scale_space_stages(maps, tmp_path / "a.png", image=2)
    with pytest.raises(ValueError, match="image index -1"):
        plot_scale_space_stages(maps, tmp_path / "a.png", image=-1)
    with pytest.raises(ValueError, match="no known scale-space stage"):
        plot_scale_space_stages({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="no known scale-space stage"):
        plot_scale_space_stages({"channel_mask": maps["mask"]}, tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- Fig. 8


def comparison_masks(rng: np.random.Generator, images: int = 5) -> dict[str, dict[str, np.ndarray]]:
    sigmoid = lambda x: (1 / (1 + np.exp(-x))).astype(np.float32)  # noqa: E731
    return {
        "CBAM": {"mask": sigmoid(rng.standard_normal((images, 1, 8, 8))), "channel_mask": np.zeros((images, 6, 1, 1))},
        "SAN-d": {
            "mask": sigmoid(rng.standard_normal((images, 6, 8, 8))).astype(np.float16),
            "image": rng.standard_normal((images, 3, 32, 32)).astype(np.float32),
        },
    }


def test_mask_comparison_figure_rows_times_input_plus_modules_on_fixed_scale():
    masks = comparison_masks(np.random.default_rng(5))
    figure, labels = mask_comparison_figure(masks, images=3)
    assert labels == ["CBAM", "SAN-d"]
    image_axes = [axes for axes in figure.axes if axes.images]
    assert len(image_axes) == 3 * (1 + 2)
    assert [axes.get_title() for axes in image_axes[:3]] == ["input", "CBAM", "SAN-d"]
    picture = image_axes[3].images[0].get_array()  # row 1, input: RGB scaled to 0..1
    assert picture.shape == (32, 32, 3) and picture.min() == 0.0 and picture.max() == pytest.approx(1.0)
    cbam = image_axes[4].images[0]
    np.testing.assert_allclose(cbam.get_array(), masks["CBAM"]["mask"][1, 0])  # one map, values kept
    assert cbam.get_clim() == (0.0, 1.0)
    assert image_axes[5].images[0].get_array().shape == (2 * 8 + 1, 3 * 8 + 2)  # 6 channels: 2×3 tiles
    assert len(figure.axes) == len(image_axes) + 1  # one shared colorbar
    assert {axes.get_anchor() for axes in image_axes} == {"N"}  # the colorbar did not re-anchor the panels


def test_plot_mask_comparison_writes_png_and_caps_rows_at_k(tmp_path):
    masks = comparison_masks(np.random.default_rng(6), images=2)
    masks["SAN-d"]["image"] = masks["SAN-d"]["image"][:, :1]  # greyscale input
    figure, _ = mask_comparison_figure(masks, images=4)
    assert len([axes for axes in figure.axes if axes.images]) == 2 * 3
    path = tmp_path / "fig8.png"
    assert plot_mask_comparison(masks, path, images=4) == ["CBAM", "SAN-d"]
    assert_only_png(path)


def test_plot_mask_comparison_without_input_images_and_missing_mask(tmp_path):
    masks = comparison_masks(np.random.default_rng(7), images=2)
    del masks["SAN-d"]["image"]
    figure, _ = mask_comparison_figure(masks)
    assert len([axes for axes in figure.axes if axes.images]) == 2 * 2
    with pytest.raises(ValueError, match="'BAM' has no 'mask'"):
        plot_mask_comparison({**masks, "BAM": {"image": np.zeros((2, 3, 8, 8))}}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- saving


def test_failed_save_keeps_previous_png_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "curves.png"
    plot_accuracy_curves({"SAN-c": [[0.1, 0.2]]}, path)
    before = path.read_bytes()

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        figures.plot_accuracy_curves({"SAN-c": [[0.3, 0.4]]}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
