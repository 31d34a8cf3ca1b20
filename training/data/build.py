"""Build the train and val ``.beton`` files of a dataset from its distribution format."""

from pathlib import Path

from training.data.catalog import EMBEDDED, FASHION_MNIST_CLASSES, FORMATS, SERIES_FORMATS
from training.data.cifar import VARIANTS as CIFAR_VARIANTS
from training.data.cifar import read_cifar_split
from training.data.gtsrb import read_gtsrb_split
from training.data.idx import read_idx_split
from training.data.imagefolder import read_imagefolder_split
from training.data.manifest import Manifest
from training.data.series import SeriesOptions, build_series
from training.data.writer import SourceSplit, WriterOptions, write_beton

SPLITS = ("train", "val")


def build_dataset(
    format: str,
    source: Path | None,
    out: Path,
    options: WriterOptions | None = None,
    strict: bool = False,
    roi_crop: bool = False,
    series: SeriesOptions | None = None,
) -> dict[str, Manifest]:
    """Write ``out/train.beton`` and ``out/val.beton`` (each with its ``.json`` manifest).

    ``format`` is a writer (`FORMATS`) reading ``source``, or an embedded dataset (`EMBEDDED`) that needs none.
    Time series (`SERIES_FORMATS`) take ``series``; an embedded series set's catalog entry fills what it leaves
    unset (its length, or its window, horizon and held-out steps). Of ``options`` they use ``num_workers`` and
    ``subset``.
    """
    options = options or WriterOptions()
    series = series or SeriesOptions()
    class_names = None
    if format in EMBEDDED:
        info = EMBEDDED[format]
        if source is None:
            source = info.embedded_source
        class_names = FASHION_MNIST_CLASSES if format == "fashion-mnist" else None
        if info.kind == "series":
            catalog = (
                {"window": info.resolution, "horizon": info.horizon, "val_steps": info.val_steps}
                if info.task == "forecast"
                else {"length": info.resolution}
            )
            series = series.model_copy(update={k: v for k, v in catalog.items() if getattr(series, k) is None})
        format = info.format
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of: {', '.join((*FORMATS, *EMBEDDED))}")
    if source is None:
        raise ValueError(f"format {format!r} needs a SOURCE directory")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such directory")
    if format in SERIES_FORMATS:
        return build_series(format, source, Path(out), series, options.num_workers, options.subset)
    # Read and check every split before writing any, so a bad val split leaves no train file behind.
    splits: list[SourceSplit] = []
    for split in SPLITS:
        classes = splits[0].classes if splits else None
        if format == "idx":
            splits.append(read_idx_split(source, split, class_names, classes))
        elif format in CIFAR_VARIANTS:
            splits.append(read_cifar_split(source, split, format))
        elif format == "gtsrb":
            splits.append(read_gtsrb_split(source, split, roi_crop, options.num_workers, strict))
        else:
            splits.append(read_imagefolder_split(source, split, classes, options.num_workers, strict))
    return {data.split: write_beton(data, Path(out) / f"{data.split}.beton", options) for data in splits}
