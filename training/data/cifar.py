"""CIFAR-10 / CIFAR-100 python pickles as distributed; ``cifar20`` is CIFAR-100 with its coarse labels.

CIFAR-10 (``cifar-10-batches-py``): ``data_batch_1..5`` (train), ``test_batch``, ``batches.meta``.
CIFAR-100 (``cifar-100-python``): ``train``, ``test``, ``meta``; labels ``fine_labels`` / ``coarse_labels``.
Every file is a pickle of a dict with bytes keys; ``b"data"`` is N×3072 uint8, the R, G and B planes of 32×32.
"""

import pickle
from pathlib import Path

import numpy as np

from training.data.writer import ArrayImages, SourceSplit, array_blocks, channel_stats

VARIANTS = {
    # variant: (train files, val files, label key, meta file, class-names key)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", "batches.meta", b"label_names"),
    "cifar100": (["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
    "cifar20": (["train"], ["test"], b"coarse_labels", "meta", b"coarse_label_names"),
}


def load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing CIFAR file")
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: not a CIFAR pickle ({error})") from error


def read_cifar_split(source: Path, split: str, variant: str) -> SourceSplit:
    """``split`` (``train`` or ``val`` = the test files) of CIFAR ``variant`` from its extracted directory."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown CIFAR variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    train_files, val_files, label_key, meta_file, names_key = VARIANTS[variant]
    images, labels = [], []
    for name in train_files if split == "train" else val_files:
        batch = load_pickle(source / name)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{source / name}: no {b'data'!r} / {label_key!r} keys (is this {variant}?)")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch[label_key]):
            raise ValueError(f"{source / name}: data of shape {data.shape} for {len(batch[label_key])} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    meta = load_pickle(source / meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    pixels = np.ascontiguousarray(np.concatenate(images))
    targets = np.concatenate(labels)
    if not names:
        names = [str(i) for i in range(int(targets.max()) + 1)]
    mean, std = channel_stats(array_blocks(pixels))
    return SourceSplit(
        format=variant,
        source=str(source),
        split=split,
        images=ArrayImages(pixels, targets),
        classes={name: i for i, name in enumerate(names)},
        channels=3,
        mean=mean,
        std=std,
    )
