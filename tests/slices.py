"""Tiny slices of the real Fashion-MNIST (the Debian package) as FFCV sets, for the end-to-end tests."""

from pathlib import Path

from training.data.build import build_dataset
from training.data.writer import WriterOptions

SLICE_PATHS = {"train_path": "fmnist-train/train.beton", "val_path": "fmnist-val/val.beton"}  # under the data root


def build_fmnist_slices(data: Path, train: int, val: int) -> None:
    """The first ``train`` training and ``val`` test images, written under ``data`` at `SLICE_PATHS`."""
    build_dataset("fashion-mnist", None, data / "fmnist-train", WriterOptions(num_workers=2, subset=train))
    build_dataset("fashion-mnist", None, data / "fmnist-val", WriterOptions(num_workers=2, subset=val))


def slice_job(epochs: int, num_workers: int = 1, cpus_per_worker: int = 1) -> dict:
    """A small LeNet-5 + SAN-c JobSpec body over the slices at `SLICE_PATHS`."""
    return {
        "model": {"name": "lenet5", "attention": "san-c"},
        "data": SLICE_PATHS,
        "training": {"epochs": epochs, "batch_size": 32},
        "validation": {"batch_size": 128},
        "lr": {"lr": 0.2, "peak_epoch": 1},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": cpus_per_worker},
    }
