"""Small datasets written in the exact on-disk formats their distributions use, for the writer tests."""

import csv
import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    """``<prefix>-images-idx3-ubyte[.gz]`` (magic 2051) and ``<prefix>-labels-idx1-ubyte[.gz]`` (magic 2049)."""
    directory.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    image_bytes = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w)) + images.tobytes()
    label_bytes = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes()
    for kind, data in (("images-idx3", image_bytes), ("labels-idx1", label_bytes)):
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            with gzip.open(directory / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (directory / name).write_bytes(data)


def _planar(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 → N×3072: the R, G, B planes, as the CIFAR pickles store them."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_cifar10(directory: Path, train: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray]):
    """``cifar-10-batches-py``: five ``data_batch_i``, ``test_batch``, ``batches.meta`` with bytes keys."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, (images, labels) in enumerate(train, start=1):
        _pickle(
            directory / f"data_batch_{i}", {b"batch_label": b"x", b"data": _planar(images), b"labels": list(labels)}
        )
    _pickle(directory / "test_batch", {b"data": _planar(test[0]), b"labels": list(test[1])})
    names = [
        n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    _pickle(directory / "batches.meta", {b"label_names": names, b"num_vis": 3072})


def write_cifar100(directory: Path, train: tuple, test: tuple) -> None:
    """``cifar-100-python``: ``train`` and ``test`` with fine and coarse labels, ``meta`` with both name lists."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (images, fine, coarse) in (("train", train), ("test", test)):
        _pickle(
            directory / name, {b"data": _planar(images), b"fine_labels": list(fine), b"coarse_labels": list(coarse)}
        )
    _pickle(
        directory / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )


GTSRB_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def _gt_row(name: str, image: np.ndarray, label: int) -> list:
    h, w = image.shape[:2]
    return [name, w, h, 1, 1, w - 1, h - 1, label]


def write_gtsrb(directory: Path, train: dict[int, list[np.ndarray]], test: list[tuple[np.ndarray, int]]) -> None:
    """Final_Training/Images/<class>/*.ppm + GT-<class>.csv; Final_Test/Images/*.ppm + GT-final_test.csv."""
    for label, images in train.items():
        folder = directory / "Final_Training" / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for i, image in enumerate(images):
            name = f"00000_{i:05d}.ppm"
            Image.fromarray(image).save(folder / name, format="PPM")
            rows.append(_gt_row(name, image, label))
        with (folder / f"GT-{label:05d}.csv").open("w", newline="") as f:
            csv.writer(f, delimiter=";").writerows([GTSRB_HEADER, *rows])
    test_dir = directory / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = []
    for i, (image, label) in enumerate(test):
        name = f"{i:05d}.ppm"
        Image.fromarray(image).save(test_dir / name, format="PPM")
        rows.append(_gt_row(name, image, label))
    with (directory / "GT-final_test.csv").open("w", newline="") as f:
        csv.writer(f, delimiter=";").writerows([GTSRB_HEADER, *rows])


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_imagenet(directory: Path, rng: np.random.Generator, flat_val: bool = True) -> dict[str, int]:
    """An ImageNet tree: varied sizes, a CMYK JPEG, a greyscale JPEG, a PNG named ``.JPEG``, and a flat ``val``
    labelled by ``LOC_val_solution.csv`` (or ``val/<wnid>/`` folders). Returns images per split."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    counts = {"train": 0, "val": 0}
    for index, wnid in enumerate(wnids):
        folder = directory / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(4):
            size = (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            Image.fromarray(random_rgb(rng, *size)).save(folder / f"{wnid}_{i}.JPEG", quality=90)
            counts["train"] += 1
        if index == 1:
            Image.new("CMYK", (50, 40), (10, 200, 30, 5)).save(folder / f"{wnid}_cmyk.JPEG")
            Image.fromarray(rng.integers(0, 256, (45, 60), dtype=np.uint8), "L").save(folder / f"{wnid}_grey.JPEG")
            Image.fromarray(random_rgb(rng, 64, 48)).save(folder / f"{wnid}_png.JPEG", format="PNG")
            counts["train"] += 3
    rows = []
    val = directory / "val"
    val.mkdir()
    for i, wnid in enumerate(wnids * 2):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        target = val if flat_val else val / wnid
        target.mkdir(exist_ok=True)
        Image.fromarray(random_rgb(rng, 70, 90)).save(target / f"{name}.JPEG")
        rows.append([name, f"{wnid} 1 2 30 40"])
        counts["val"] += 1
    if flat_val:
        with (directory / "LOC_val_solution.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["ImageId", "PredictionString"], *rows])
    return counts
