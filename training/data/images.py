"""Image files on disk: decoding to RGB, checking in parallel, and pixel statistics from a sample."""

from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.data.writer import channel_stats, evenly_spread

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".bmp", ".webp", ".tif", ".tiff"})
STATS_SAMPLE = 500  # images decoded to estimate the per-channel mean and std


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_rgb(path: Path, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Decode any PIL-readable file to an H×W×3 uint8 array: CMYK and greyscale JPEGs, palette PNGs and PNGs
    named ``.JPEG`` (as in real ImageNet) all come out RGB. ``box`` crops (left, top, right, bottom) first."""
    with Image.open(path) as image:
        if box is not None:
            image = image.crop(box)
        return np.asarray(image.convert("RGB"))


def _check(path: Path) -> str | None:
    """None if the whole file decodes, else the reason. JPEGs decode at 1/8 scale: every byte is still read."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(image.width // 8, 1), max(image.height // 8, 1)))
            image.load()
        return None
    except Exception as error:  # PIL raises many types for bad files; all mean "unreadable"
        return f"{type(error).__name__}: {error}"


def find_unreadable(files: Sequence[Path], num_workers: int, desc: str) -> dict[str, str]:
    """Decode every file in ``num_workers`` processes; returns ``{path: reason}`` for those that fail."""
    bad: dict[str, str] = {}
    with get_context("fork").Pool(num_workers) as pool:
        results = pool.imap(_check, files, chunksize=64)
        for path, reason in tqdm(zip(files, results, strict=True), total=len(files), desc=desc, unit="img"):
            if reason is not None:
                bad[str(path)] = reason
    return bad


def sample_stats(
    files: Sequence[Path], boxes: Sequence[tuple[int, int, int, int] | None] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0–255) over up to `STATS_SAMPLE` images spread evenly over ``files``."""
    return channel_stats(
        load_rgb(files[index], boxes[index] if boxes else None) for index in evenly_spread(len(files), STATS_SAMPLE)
    )


class FileImages:
    """Image files with labels (and optional crop boxes), decoded on access."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], boxes=None) -> None:
        self.files, self.labels, self.boxes = list(files), list(labels), boxes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return load_rgb(self.files[index], self.boxes[index] if self.boxes else None), self.labels[index]


def drop_unreadable(
    files: list[Path], labels: list[int], boxes, num_workers: int, strict: bool, desc: str
) -> tuple[list[Path], list[int], list | None, list[str]]:
    """Check every file; leave out (or, with ``strict``, refuse) those that do not decode."""
    bad = find_unreadable(files, num_workers, desc)
    if bad and strict:
        listed = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:5])
        raise ValueError(f"{len(bad)} unreadable image(s): {listed}" + (" …" if len(bad) > 5 else ""))
    keep = [i for i, path in enumerate(files) if str(path) not in bad]
    return (
        [files[i] for i in keep],
        [labels[i] for i in keep],
        [boxes[i] for i in keep] if boxes else None,
        sorted(bad),
    )
