"""FFCV loaders for training and validation, on CPU or GPU, sharded inside a process group.

On CPU, ffcv's own ``NormalizeImage`` runs in the loader's threads (a lookup table, in parallel) before the
tensor conversion; on a GPU the pipeline hands uint8 images to the device and `Normalize` finishes there in
torch, which needs no cupy. Pipeline order matters on CPU — ffcv's GPU example order (``ToTensor → ToDevice →
ToTorchImage → NormalizeImage``) makes ``Loader(...)`` hang with no error there — so `image_pipeline` picks the
order by device.
"""

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import (
    NormalizeImage,
    Squeeze,
    ToDevice,
    ToTensor,
    ToTorchImage,
)

from training.data.augment import SeededHorizontalFlip, SeededRandomResizedCropDecoder, SeededTranslate
from training.data.manifest import Manifest, load_manifest

IMAGENET_CROP_RATIO = 224 / 256
SMALL_IMAGE_LIMIT = 64  # sets stored at most this large get the small-image pipeline
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, for RGB data fed to 1-channel models
# FFCV compiles a loader's pipeline with numba on its first batch, in every worker process of every job: ~4.8 s for
# the small-image training pipeline, ~0.6 s for validation's (2-core AMD EPYC). Run as Python, the same operations
# give the same bytes at ~0.4 ms (training) and ~0.3 ms (validation) an image; so a loader that will read fewer
# images than these over its whole job starts faster uncompiled (docs/decisions/0007-ffcv-jit-for-small-jobs.md).
JIT_MIN_IMAGES = {True: 10_000, False: 2_000}  # by ``train``


def is_small(manifest: Manifest) -> bool:
    return max(manifest.resolution) <= SMALL_IMAGE_LIMIT


CROPS = ("auto", "random-resized", "translate")


def image_pipeline(
    decoder: Operation,
    train: bool,
    flip: bool,
    translate: bool,
    resolution: int,
    device: torch.device,
    mean: np.ndarray,
    std: np.ndarray,
    seed: int,
) -> list[Operation]:
    """Decoder, augmentation (a shift by up to 1/8 of the side with zero fill, a flip, both drawn from ``seed``),
    then N×3×H×W channels-last images: float32 normalised on CPU, uint8 on ``device`` for `Normalize`."""
    ops: list[Operation] = [decoder]
    if train and translate:
        ops.append(SeededTranslate(max(resolution // 8, 1), seed))
    if train and flip:
        ops.append(SeededHorizontalFlip(seed))
    if device.type == "cuda":
        ops += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    else:
        ops += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(channels_last=True)]
    return ops


class Normalize:
    """The step after the pipeline: select or make the model's channels, and on a GPU convert uint8 to float32
    and normalise with the 0–255 ``mean``/``std``."""

    def __init__(self, mean, std, in_chans: int, source_channels: int, device: torch.device) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.on_device = device.type == "cuda"
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.inverse_std = 1 / torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.first_channel = in_chans == 1 and source_channels == 1  # greyscale stored as three equal channels
        self.to_grey = in_chans == 1 and source_channels == 3
        self.grey_weights = torch.tensor(GREY_WEIGHTS, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.on_device:
            images = images.float().sub_(self.mean).mul_(self.inverse_std)
        if self.first_channel:
            return images[:, :1]
        if self.to_grey:
            return (images * self.grey_weights).sum(1, keepdim=True)
        return images


class ImageLoader:
    """An FFCV loader yielding ``(normalised float images, int64 labels)``; `set_resolution` serves
    progressive resizing (call it before an epoch)."""

    def __init__(self, loader: Loader, decoder: Operation, normalize: Normalize, manifest: Manifest) -> None:
        self.loader, self.decoder, self.normalize, self.manifest = loader, decoder, normalize, manifest

    @property
    def resolution(self) -> int:
        return self.decoder.output_size[0]

    def set_resolution(self, resolution: int) -> None:
        self.decoder.output_size = (resolution, resolution)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield self.normalize(images), labels


def read_fields(path: Path) -> list[str]:
    """The ``.beton``'s field names, read from its header, metadata and allocation table — where a truncated file
    fails, as a ValueError naming the file."""
    try:
        return list(Reader(str(path)).field_names)
    except (ValueError, OSError, AssertionError, IndexError, EOFError) as error:
        raise ValueError(f"{path}: cannot be read as an FFCV dataset ({type(error).__name__}: {error})") from error


def compiles(count: int, train: bool, epochs: int | None, distributed: bool, shard: tuple[int, int] | None) -> bool:
    """Whether a loader of ``count`` records, read ``epochs`` times (None: not known) by this process's share of
    the workers, is worth numba's compile (`JIT_MIN_IMAGES`)."""
    if epochs is None:
        return True
    world = shard[1] if shard else torch.distributed.get_world_size() if distributed else 1
    return epochs * -(-count // world) >= JIT_MIN_IMAGES[train]


@contextlib.contextmanager
def _compiler(enabled: bool):
    """FFCV's switch is one class attribute, read while a Loader builds its pipeline's code: set it for one."""
    previous = Compiler.is_enabled
    Compiler.set_enabled(enabled)
    try:
        yield
    finally:
        Compiler.set_enabled(previous)


def ffcv_loader(path: Path, count: int, pipelines: dict, *, train: bool, batch_size: int, distributed: bool,
                shard: tuple[int, int] | None, seed: int, num_workers: int, drop_last: bool | None,
                os_cache: bool, epochs: int | None = None) -> Loader:  # fmt: skip
    """The FFCV loader of any set (images or series) of ``count`` records: random order from ``seed`` for training,
    file order for validation; ``distributed`` shards over the process group, ``shard=(rank, world)`` reads records
    rank, rank + world, … exactly; ``drop_last`` defaults to ``train``. ``epochs``: how often the job will read it,
    if known — a small job's pipeline runs uncompiled (`compiles`)."""
    if distributed and shard is not None:
        raise ValueError("distributed=True and shard=... are alternatives; pass one")
    if not 1 <= num_workers <= (os.cpu_count() or 1):
        raise ValueError(f"num_workers={num_workers}: this machine has {os.cpu_count()} cores")

    def build() -> Loader:
        with _compiler(compiles(count, train, epochs, distributed, shard)):  # the Loader builds its code here
            return Loader(
                str(path),
                batch_size=batch_size,
                num_workers=num_workers,
                os_cache=os_cache,
                order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
                distributed=distributed,
                indices=None if shard is None else np.arange(shard[0], count, shard[1]),
                seed=seed,
                drop_last=train if drop_last is None else drop_last,
                pipelines=pipelines,
            )

    try:
        return build()
    except SystemError as error:
        # CPython 3.11's ast.parse now and then fails this way in a threaded process (cpython#106905: its recursion
        # count is interpreter state, and numba's compile parses too, in FFCV's threads); generating again is safe.
        if "AST constructor recursion depth mismatch" not in str(error):
            raise
        return build()


def make_loader(
    path: Path,
    *,
    train: bool,
    batch_size: int,
    resolution: int | None = None,
    in_chans: int = 3,
    mean=None,
    std=None,
    flip: bool = True,
    crop: str = "auto",
    device: str | torch.device = "cpu",
    distributed: bool = False,
    shard: tuple[int, int] | None = None,
    seed: int = 0,
    num_workers: int = 1,
    drop_last: bool | None = None,
    os_cache: bool = True,
    epochs: int | None = None,
) -> ImageLoader:
    """A train or validation loader over ``path``.

    ``resolution`` defaults to the set's stored size for small sets and 224 otherwise; ``mean``/``std`` to the
    manifest's (pass the *train* split's for validation). Training crops with ``crop``: ``random-resized``
    (ImageNet's), or ``translate`` — the whole image resized and shifted, since a random-resized crop would cut
    away most of a 28-px digit; ``auto`` picks ``translate`` for small sets (at most 64 px stored). Validation
    centre-crops at ratio 224/256 for large images and keeps small ones whole. ``distributed=True`` shards over
    the initialised process group (random order needs the explicit ``seed``); it pads uneven shards by repeating
    images, so exact evaluation uses ``shard=(rank, world_size)`` instead: images rank, rank + world, ... .
    ``drop_last`` defaults to True for training and False for validation. ``seed`` also draws the crop, the
    shift and the flip (`training.data.augment`), so runs repeat exactly. ``epochs``: how often the job will read
    the set, if known; a small job's pipeline runs uncompiled, which starts faster (`JIT_MIN_IMAGES`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .beton file")
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; choose one of: {', '.join(CROPS)}")
    manifest = load_manifest(path)
    small = is_small(manifest)
    translate = crop == "translate" or (crop == "auto" and small)
    resolution = resolution or (max(manifest.resolution) if small else 224)
    device = torch.device(device)
    mean = np.asarray(manifest.mean if mean is None else mean, dtype=np.float64)
    std = np.asarray(manifest.std if std is None else std, dtype=np.float64)
    if train and not translate:
        decoder: Operation = SeededRandomResizedCropDecoder((resolution, resolution), seed)
    else:
        decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=1.0 if small else IMAGENET_CROP_RATIO)
    label_ops: list[Operation] = [IntDecoder(), ToTensor(), Squeeze(1)]  # (N, 1) → (N,), also for N = 1
    if device.type == "cuda":
        label_ops.append(ToDevice(device, non_blocking=True))
    read_fields(path)
    pipelines = {
        "image": image_pipeline(decoder, train, flip, translate, resolution, device, mean, std, seed),
        "label": label_ops,
    }
    loader = ffcv_loader(path, manifest.count, pipelines, train=train, batch_size=batch_size, distributed=distributed,
                         shard=shard, seed=seed, num_workers=num_workers, drop_last=drop_last, os_cache=os_cache,
                         epochs=epochs)  # fmt: skip
    return ImageLoader(loader, decoder, Normalize(mean, std, in_chans, manifest.channels, device), manifest)
