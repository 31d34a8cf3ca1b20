"""FFCV loaders for training and validation, on CPU or GPU, sharded inside a process group.

The pipelines hand uint8 images to the training step, which converts and normalises them in torch (on the
GPU when there is one): that keeps float work out of the loader's threads and needs no cupy. Pipeline order
matters on CPU — ffcv's GPU example order (``ToTensor → ToDevice → ToTorchImage → NormalizeImage``) makes
``Loader(...)`` hang with no error there — so the order is chosen by device in `image_pipeline`.
"""

from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.operation import Operation
from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage

from training.data.manifest import Manifest, load_manifest

IMAGENET_CROP_RATIO = 224 / 256
SMALL_IMAGE_LIMIT = 64  # sets stored at most this large get the small-image pipeline
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, for RGB data fed to 1-channel models


def is_small(manifest: Manifest) -> bool:
    return max(manifest.resolution) <= SMALL_IMAGE_LIMIT


def image_pipeline(
    decoder: Operation, train: bool, flip: bool, small: bool, resolution: int, device: torch.device
) -> list[Operation]:
    """Decoder, augmentation, then uint8 N×C×H×W on ``device``.

    Small images (28/32 px) are trained on whole — a random-resized crop would cut away most of a 28-px digit —
    and shifted by up to 1/8 of their side (zero fill) instead; large ones get the random-resized crop.
    """
    ops: list[Operation] = [decoder]
    if train and small:
        ops.append(RandomTranslate(padding=max(resolution // 8, 1)))
    if train and flip:
        ops.append(RandomHorizontalFlip())
    ops.append(ToTensor())
    if device.type == "cuda":
        ops += [ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    else:
        ops.append(ToTorchImage(channels_last=True))
    return ops


class Normalize:
    """uint8 N×3×H×W → float32, minus mean, over std (0–255 statistics), optionally reduced to one channel."""

    def __init__(self, mean, std, in_chans: int, source_channels: int, device: torch.device) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
        std_t = torch.tensor(std, dtype=torch.float32, device=device)
        self.to_grey = in_chans == 1 and source_channels == 3
        self.first_channel = in_chans == 1 and source_channels == 1  # greyscale stored as three equal channels
        if self.to_grey:
            weights = torch.tensor(GREY_WEIGHTS, device=device)
            mean_t, std_t = (weights * mean_t).sum(0, keepdim=True), (weights * std_t).sum(0, keepdim=True)
            self.weights = weights.view(1, 3, 1, 1)
        elif self.first_channel:
            mean_t, std_t = mean_t[:1], std_t[:1]
        self.mean, self.std = mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.first_channel:
            images = images[:, :1]
        x = images.float()
        if self.to_grey:
            x = (x * self.weights).sum(1, keepdim=True)
        return (x - self.mean) / self.std


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
    device: str | torch.device = "cpu",
    distributed: bool = False,
    seed: int = 0,
    num_workers: int = 1,
    drop_last: bool | None = None,
    os_cache: bool = True,
) -> ImageLoader:
    """A train or validation loader over ``path``.

    ``resolution`` defaults to the set's stored size for small sets and 224 otherwise; ``mean``/``std`` to the
    manifest's (pass the *train* split's for validation). Validation centre-crops at ratio 224/256 for large
    images and keeps small ones whole. ``distributed=True`` shards over the initialised process group (random
    order needs the explicit ``seed``); ``drop_last`` defaults to True for training and False for validation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .beton file")
    manifest = load_manifest(path)
    small = is_small(manifest)
    resolution = resolution or (max(manifest.resolution) if small else 224)
    device = torch.device(device)
    if train and not small:
        decoder: Operation = RandomResizedCropRGBImageDecoder((resolution, resolution))
    else:
        decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=1.0 if small else IMAGENET_CROP_RATIO)
    label_ops: list[Operation] = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        label_ops.append(ToDevice(device, non_blocking=True))
    try:
        loader = Loader(
            str(path),
            batch_size=batch_size,
            num_workers=num_workers,
            os_cache=os_cache,
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
            distributed=distributed,
            seed=seed,
            drop_last=train if drop_last is None else drop_last,
            pipelines={"image": image_pipeline(decoder, train, flip, small, resolution, device), "label": label_ops},
        )
    except (ValueError, OSError, AssertionError, IndexError) as error:
        raise ValueError(f"{path}: cannot be read as an FFCV dataset ({type(error).__name__}: {error})") from error
    normalize = Normalize(
        np.asarray(mean if mean is not None else manifest.mean),
        np.asarray(std if std is not None else manifest.std),
        in_chans,
        manifest.channels,
        device,
    )
    return ImageLoader(loader, decoder, normalize, manifest)
