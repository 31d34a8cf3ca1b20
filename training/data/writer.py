"""Write an indexable image set to a ``.beton`` (image + int label) and its manifest, atomically."""

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.writer import DatasetWriter
from pydantic import BaseModel, Field

from training.data.manifest import Manifest, save_manifest, write_atomically


class ImageSet(Protocol):
    """``images[i]`` is ``(uint8 H×W×3 array, label)``."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class WriterOptions(BaseModel):
    """ffcv-imagenet's writer options. ``subset``: keep this many images, spread evenly over the set."""

    write_mode: Literal["raw", "jpg", "smart", "proportion"] = "raw"
    max_resolution: int | None = Field(default=None, gt=0)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    compress_probability: float = Field(default=0.5, ge=0, le=1)
    num_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    subset: int | None = Field(default=None, gt=0)
    chunksize: int = Field(default=100, ge=1)


@dataclass
class SourceSplit:
    """One split of a source dataset, read and checked, ready to write."""

    format: str
    source: str
    split: str
    images: ImageSet
    classes: dict[str, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: dict[str, list[str]] = field(default_factory=dict)


class ArrayImages:
    """N×H×W×3 uint8 images held in memory, with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class Subset:
    """``images`` restricted to ``indices``."""

    def __init__(self, images: ImageSet, indices: Sequence[int]) -> None:
        self.images, self.indices = images, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[self.indices[index]]


def evenly_spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (so sorted-by-class sets keep every class)."""
    if count >= total:
        return list(range(total))
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


def write_beton(split: SourceSplit, out: Path, options: WriterOptions) -> Manifest:
    """Write ``split`` to ``out`` (a temp file renamed into place) and its manifest; print a summary line."""
    out = Path(out)
    images = (
        split.images
        if options.subset is None
        else Subset(split.images, evenly_spread(len(split.images), options.subset))
    )
    if len(images) == 0:
        raise ValueError(f"no images to write for {split.source} ({split.split})")
    started = time.perf_counter()

    stored: dict[str, int] = {}

    def write(temp: Path) -> None:
        image_field = RGBImageField(
            write_mode=options.write_mode,
            max_resolution=options.max_resolution,
            jpeg_quality=options.jpeg_quality,
            compress_probability=options.compress_probability,
        )
        writer = DatasetWriter(str(temp), {"image": image_field, "label": IntField()}, num_workers=options.num_workers)
        writer.from_indexed_dataset(images, chunksize=options.chunksize)
        reader = Reader(str(temp))  # read back before the rename: a file that does not check out never lands
        metadata = reader.metadata[f"f{reader.field_names.index('image')}"]
        if reader.num_samples != len(images):
            raise RuntimeError(f"{temp}: wrote {reader.num_samples} records for {len(images)} images")
        stored.update(height=int(metadata["height"].max()), width=int(metadata["width"].max()))
        temp.chmod(0o644)

    write_atomically(out, write)
    manifest = Manifest(
        format=split.format,
        source=split.source,
        split=split.split,
        count=len(images),
        classes=split.classes,
        resolution=(stored["height"], stored["width"]),
        mean=split.mean,
        std=split.std,
        channels=split.channels,
        options=options.model_dump(exclude={"num_workers", "chunksize"}),
        skipped=split.skipped,
    )
    save_manifest(manifest, out)
    seconds = time.perf_counter() - started
    skipped = sum(len(files) for files in split.skipped.values())
    print(
        f"{out}: {manifest.count:,} images, {manifest.num_classes} classes, {out.stat().st_size / 2**20:.1f} MiB, "
        f"{seconds:.1f} s"
        + (f", {skipped} files skipped (listed in {out.with_suffix('.json').name})" if skipped else "")
    )
    return manifest


def channel_stats(blocks: Iterable[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0–255 scale), in float64, of uint8 pixels given as blocks of shape ``(..., C)``
    (C = 1 for greyscale): the whole set is never held as float64 at once."""
    total = square = None
    count = 0
    for block in blocks:
        flat = block.reshape(-1, block.shape[-1]).astype(np.float64)
        total = flat.sum(0) if total is None else total + flat.sum(0)
        square = (flat**2).sum(0) if square is None else square + (flat**2).sum(0)
        count += len(flat)
    mean = total / count
    std = np.sqrt(square / count - mean**2)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def array_blocks(pixels: np.ndarray, rows: int = 1 << 22) -> Iterator[np.ndarray]:
    """An ``N×H×W[×C]`` uint8 array as blocks of at most ``rows`` pixels, shaped ``(rows, C)``."""
    flat = pixels.reshape(-1, pixels.shape[-1] if pixels.ndim == 4 else 1)
    for start in range(0, len(flat), rows):
        yield flat[start : start + rows]
