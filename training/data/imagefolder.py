"""ImageNet-style folders: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, or the flat validation folder
``val/*.JPEG`` labelled by ``LOC_val_solution.csv`` (``ImageId,PredictionString`` = ``"<wnid> x y x y ..."``)."""

import csv
from pathlib import Path

from training.data.images import FileImages, drop_unreadable, is_image_name, sample_stats
from training.data.writer import SourceSplit

SOLUTION_CSV = "LOC_val_solution.csv"


def _files_by_class(split_dir: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Image files per class folder, and the non-image files met on the way."""
    by_class: dict[str, list[Path]] = {}
    not_images: list[str] = []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = []
        for path in sorted(folder.iterdir()):
            if path.is_file() and is_image_name(path):
                files.append(path)
            elif path.is_file():
                not_images.append(str(path))
        if not files:
            raise ValueError(f"{folder}: class folder with no images")
        by_class[folder.name] = files
    return by_class, not_images


def _flat_validation(split_dir: Path, source: Path) -> tuple[dict[str, list[Path]], list[str]]:
    solution = next((p for p in (source / SOLUTION_CSV, split_dir / SOLUTION_CSV) if p.is_file()), None)
    if solution is None:
        raise FileNotFoundError(f"{split_dir}: no class folders and no {SOLUTION_CSV} in {source} to label it")
    labels: dict[str, str] = {}
    with solution.open(newline="") as f:
        for row in csv.DictReader(f):
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
    by_class: dict[str, list[Path]] = {}
    not_images: list[str] = []
    for path in sorted(p for p in split_dir.iterdir() if p.is_file()):
        if not is_image_name(path):
            not_images.append(str(path))
        elif path.stem in labels:
            by_class.setdefault(labels[path.stem], []).append(path)
        else:
            raise ValueError(f"{path}: not listed in {solution}")
    return by_class, not_images


def read_imagefolder_split(
    source: Path,
    split: str,
    classes: dict[str, int] | None = None,
    num_workers: int = 1,
    strict: bool = False,
) -> SourceSplit:
    """One split (``train`` or ``val``) under ``source``; ``classes`` (the train split's) labels the val split."""
    source = Path(source)
    split_dir = source / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such directory (expected {source}/{{train,val}}/<class>/*.JPEG)")
    has_folders = any(p.is_dir() for p in split_dir.iterdir())
    if not has_folders and (split == "train" or not any(split_dir.iterdir())):
        raise ValueError(f"{split_dir}: no images (expected class folders <class>/*.JPEG)")
    by_class, not_images = _files_by_class(split_dir) if has_folders else _flat_validation(split_dir, source)
    if not by_class:
        raise ValueError(f"{split_dir}: no images")
    if classes is None:
        classes = {name: index for index, name in enumerate(sorted(by_class))}
    unknown = sorted(set(by_class) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir}: classes not in the train split: {', '.join(unknown[:10])}")
    files = [path for name in sorted(by_class) for path in by_class[name]]
    labels = [classes[name] for name in sorted(by_class) for _ in by_class[name]]
    files, labels, _, unreadable = drop_unreadable(files, labels, None, num_workers, strict, f"checking {split}")
    if not files:
        raise ValueError(f"{split_dir}: no readable images")
    mean, std = sample_stats(files)
    skipped = {name: found for name, found in (("not an image", not_images), ("unreadable", unreadable)) if found}
    return SourceSplit(
        format="imagenet",
        source=str(source),
        split=split,
        images=FileImages(files, labels),
        classes=classes,
        channels=3,
        mean=mean,
        std=std,
        skipped=skipped,
    )
