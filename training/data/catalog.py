"""Named datasets: their writer, classes, native resolution, published normalisation, sizes, and where the
embedded one lives.

The normalisation here is the one usually published for each set (0–255 scale, RGB; greyscale sets repeat their
value); loaders use what the writer measured on the actual train split, stored in its manifest. Time series
(``kind="series"``) publish none: their writer measures it on the train split (`training.data.series`).
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

# The writers, by the name `san data build` takes: each reads one distribution format.
IMAGE_FORMATS = ("imagenet", "idx", "cifar10", "cifar100", "cifar20", "gtsrb")
SERIES_FORMATS = ("ts", "forecast-csv")  # UEA/sktime .ts classification files; one CSV series cut into windows
FORMATS = (*IMAGE_FORMATS, *SERIES_FORMATS)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    format: str  # the writer that reads its distribution files
    num_classes: int  # model outputs: classes, or for a forecast the steps predicted (``horizon``)
    resolution: int  # native side in pixels (ImageNet: the usual training size); series: steps per record T
    channels: int  # image channels; series: features per step F
    mean: tuple[float, ...]  # three values (RGB) for images; empty for series
    std: tuple[float, ...]
    train_count: int  # images, or series records (a forecast's windows)
    val_count: int
    description: str
    embedded_source: Path | None = None  # a package on this machine that holds the files
    kind: str = "image"  # or "series"
    task: str = "classification"  # or "forecast"
    horizon: int | None = None  # forecast: steps predicted after each window of ``resolution`` steps
    val_steps: int | None = None  # forecast: the series' last steps, held out as validation targets


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def sktime_data(name: str) -> Path | None:
    """``sktime/datasets/data/<name>`` of the installed sktime, found without importing it (that takes seconds)."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    return folder if folder.is_dir() else None


CATALOG: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "fashion-mnist", "idx", 10, 28, 1, (72.93, 72.93, 72.93), (90.02, 90.02, 90.02), 60_000, 10_000,
            "Zalando's Fashion-MNIST (the paper's FMNIST), embedded from Debian's dataset-fashion-mnist",
            Path("/usr/share/datasets/fashion-mnist"),
        ),
        DatasetInfo(
            "mnist", "idx", 10, 28, 1, (33.33, 33.33, 33.33), (78.57, 78.57, 78.57), 60_000, 10_000,
            "MNIST handwritten digits",
        ),
        DatasetInfo(
            "cifar10", "cifar10", 10, 32, 3, (125.31, 122.96, 113.86), (62.98, 62.09, 66.71), 50_000, 10_000,
            "CIFAR-10 python pickles (cifar-10-batches-py)",
        ),
        DatasetInfo(
            "cifar20", "cifar20", 20, 32, 3, (129.31, 124.06, 112.43), (68.16, 65.38, 70.43), 50_000, 10_000,
            "CIFAR-100 with its 20 coarse superclass labels (the paper's CIFAR20)",
        ),
        DatasetInfo(
            "cifar100", "cifar100", 100, 32, 3, (129.31, 124.06, 112.43), (68.16, 65.38, 70.43), 50_000, 10_000,
            "CIFAR-100 python pickles (cifar-100-python)",
        ),
        DatasetInfo(
            "gtsrb", "gtsrb", 43, 32, 3, (86.78, 79.59, 81.96), (69.46, 66.50, 68.06), 39_209, 12_630,
            "German Traffic Sign Recognition Benchmark (Final_Training / Final_Test ppm + csv)",
        ),
        DatasetInfo(
            "imagenet", "imagenet", 1000, 224, 3, (123.67, 116.28, 103.53), (58.40, 57.12, 57.38), 1_281_167,
            50_000, "ImageNet-1k (ILSVRC2012) in its train/<wnid>/*.JPEG layout",
        ),
        DatasetInfo(
            "basic-motions", "ts", 4, 100, 6, (), (), 40, 40,
            "BasicMotions (UEA): smart-watch accelerometer + gyroscope, 100 steps × 6, 4 activities; from sktime",
            sktime_data("BasicMotions"), kind="series",
        ),
        DatasetInfo(
            "japanese-vowels", "ts", 9, 29, 12, (), (), 270, 370,
            "JapaneseVowels (UEA): 12 LPC cepstra of 7–29 frames, edge-padded to 29, 9 speakers; from sktime",
            sktime_data("JapaneseVowels"), kind="series",
        ),
        DatasetInfo(
            "airline", "forecast-csv", 12, 24, 1, (), (), 85, 13,
            "Monthly airline passengers 1949–1960 (144 months; the forecasting role): windows of 24 months predict "
            "the next 12; the last 24 months are the validation targets; from sktime",
            sktime_data("Airline"), kind="series", task="forecast", horizon=12, val_steps=24,
        ),
    ]
}  # fmt: skip


EMBEDDED = {name: info for name, info in CATALOG.items() if info.embedded_source is not None}


def dataset_info(name: str) -> DatasetInfo:
    if name not in CATALOG:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(CATALOG)}")
    return CATALOG[name]
