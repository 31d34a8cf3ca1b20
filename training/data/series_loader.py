"""FFCV loaders over time-series ``.beton`` files (`training.data.series`), and `make_any_loader`, which picks the
image or the series loader from a file's manifest so the training loop calls one thing.

Sharding, ordering and seeds follow `training.data.loaders.make_loader`. Normalisation runs in torch after the
pipeline, on ``device``, with the train split's statistics that both manifests carry.

Forecasts are also made relative to the window's last step (its *level*): each input feature minus its value at
the last input step, each target minus its column's value there. A trending series (Airline's passengers grow
threefold in 12 years) puts the validation months above anything seen in training; relative to the last
observation, train and validation windows look alike, and the model predicts changes, which it can. Errors are
unchanged by the shift (`training.tasks`); `denormalize` adds the level back.
"""

from pathlib import Path
from typing import Any

import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.ndarray import NDArrayDecoder
from ffcv.loader import Loader
from ffcv.pipeline.operation import Operation
from ffcv.transforms import Squeeze, ToDevice, ToTensor

from training.data.loaders import ImageLoader, ffcv_loader, make_loader, read_fields
from training.data.manifest import Manifest, load_manifest

# make_loader's arguments that have no meaning for a series: make_any_loader drops them
IMAGE_ONLY = ("resolution", "mean", "std", "flip", "crop")


class SeriesLoader:
    """An FFCV loader yielding ``(inputs, targets)``: float32 ``N×T×F`` normalised inputs, and int64 ``(N,)``
    labels or float32 normalised ``N×(horizon·K)`` forecasts (time-major: step 0's K targets first), on the
    device. `resolution` and `set_resolution` exist so the training loop treats both loaders alike."""

    def __init__(self, loader: Loader, manifest: Manifest, device: torch.device) -> None:
        self.loader, self.manifest = loader, manifest
        self.forecast = manifest.task == "forecast"
        self.mean = torch.tensor(manifest.mean, dtype=torch.float32, device=device)
        self.inverse_std = 1 / torch.tensor(manifest.std, dtype=torch.float32, device=device)
        if self.forecast:
            self.target_mean = torch.tensor(manifest.target_mean, dtype=torch.float32, device=device)
            self.target_std = torch.tensor(manifest.target_std, dtype=torch.float32, device=device)
            self.target_columns = [manifest.features.index(name) for name in manifest.targets]

    @property
    def resolution(self) -> int:
        """Steps per record (T): series have no progressive resizing."""
        return self.manifest.shape[0]

    def set_resolution(self, resolution: int) -> None:
        """A no-op: a series has one length."""

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for inputs, targets, _ in self.with_levels():
            yield inputs, targets

    def with_levels(self):
        """``(inputs, targets, level)``: a forecast's level is each target column's normalised value at the last
        input step (``N×K``), which `denormalize` adds back; a classification's is None."""
        for inputs, targets in self.loader:
            inputs = (inputs - self.mean) * self.inverse_std  # a new tensor: ffcv reuses its batch buffers
            if not self.forecast:
                yield inputs, targets.clone(), None
                continue
            level = inputs[:, -1, self.target_columns]
            targets = (targets.view(len(targets), -1, len(self.target_mean)) - self.target_mean) / self.target_std
            targets = (targets - level[:, None, :]).reshape(len(targets), -1)
            yield inputs - inputs[:, -1:, :], targets, level

    def denormalize(self, targets: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Forecast outputs or targets (``N×(horizon·K)``, relative to ``level``) in the data's own units."""
        if not self.forecast:
            raise ValueError("denormalize: only forecasts have target statistics")
        shaped = targets.reshape(len(targets), -1, len(self.target_mean)) + level[:, None, :].to(targets.device)
        return (shaped * self.target_std.to(targets.device) + self.target_mean.to(targets.device)).reshape(
            targets.shape
        )


def make_series_loader(
    path: Path,
    *,
    train: bool,
    batch_size: int,
    device: str | torch.device = "cpu",
    distributed: bool = False,
    shard: tuple[int, int] | None = None,
    seed: int = 0,
    num_workers: int = 1,
    drop_last: bool | None = None,
    os_cache: bool = True,
    epochs: int | None = None,
) -> SeriesLoader:
    """A train (random order from ``seed``, new each epoch) or validation (file order) loader over a series
    ``.beton``. ``distributed=True`` shards over the initialised process group, padding uneven shards;
    ``shard=(rank, world_size)`` reads records rank, rank + world, ... exactly. ``drop_last`` defaults to True
    for training and False for validation. ``epochs``: as `make_loader`'s."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .beton file")
    manifest = load_manifest(path)
    if manifest.kind != "series" or manifest.shape is None:
        raise ValueError(f"{path}: an {manifest.kind} set, not a series (use make_loader or make_any_loader)")
    target_field = "target" if manifest.task == "forecast" else "label"
    fields = read_fields(path)
    if fields != ["series", target_field]:
        raise ValueError(f"{path}: fields {fields}, expected ['series', '{target_field}'] for a {manifest.task}")
    device = torch.device(device)
    to_device: list[Operation] = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    target_ops: list[Operation] = (
        [NDArrayDecoder(), ToTensor(), *to_device]
        if manifest.task == "forecast"
        else [IntDecoder(), ToTensor(), Squeeze(1), *to_device]  # (N, 1) → (N,), also for N = 1
    )
    pipelines = {"series": [NDArrayDecoder(), ToTensor(), *to_device], target_field: target_ops}
    loader = ffcv_loader(path, manifest.count, pipelines, train=train, batch_size=batch_size, distributed=distributed,
                         shard=shard, seed=seed, num_workers=num_workers, drop_last=drop_last, os_cache=os_cache,
                         epochs=epochs)  # fmt: skip
    return SeriesLoader(loader, manifest, device)


def make_any_loader(path: Path, *, train: bool, batch_size: int, **kwargs: Any) -> ImageLoader | SeriesLoader:
    """`make_loader` or `make_series_loader`, by the manifest's ``kind``, with `make_loader`'s keyword arguments.

    For a series the image-only ones (``resolution``, ``mean``, ``std``, ``flip``, ``crop``) are dropped: its
    manifests carry the train split's statistics in both splits. ``in_chans``, if given, must equal the features F.
    """
    manifest = load_manifest(Path(path))
    if manifest.kind != "series":
        return make_loader(path, train=train, batch_size=batch_size, **kwargs)
    in_chans = kwargs.pop("in_chans", None)
    if in_chans is not None and in_chans != manifest.channels:
        raise ValueError(f"{path}: in_chans={in_chans}, but the series has {manifest.channels} features")
    for name in IMAGE_ONLY:
        kwargs.pop(name, None)
    return make_series_loader(path, train=train, batch_size=batch_size, **kwargs)
