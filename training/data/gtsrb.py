"""GTSRB as distributed: ``Final_Training/Images/<class>/*.ppm`` with one ``GT-<class>.csv`` per class folder, and
``Final_Test/Images/*.ppm`` labelled by ``GT-final_test.csv`` (the separate ground-truth download; looked for in
``Final_Test/Images/``, ``Final_Test/`` and the source root). The CSVs are semicolon-separated:
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``."""

import csv
from pathlib import Path

from training.data.images import FileImages, drop_unreadable, sample_stats
from training.data.writer import SourceSplit

NUM_CLASSES = 43
TEST_CSV = "GT-final_test.csv"


def _read_csv(path: Path, folder: Path, roi_crop: bool) -> list[tuple[Path, int, tuple | None]]:
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f, delimiter=";"):
            try:
                box = tuple(int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")) if roi_crop else None
                rows.append((folder / row["Filename"], int(row["ClassId"]), box))
            except (KeyError, ValueError) as error:
                raise ValueError(f"{path}: bad row {row} ({error})") from error
    return rows


def read_gtsrb_split(
    source: Path, split: str, roi_crop: bool = False, num_workers: int = 1, strict: bool = False
) -> SourceSplit:
    """``train`` (Final_Training) or ``val`` (Final_Test) of GTSRB; ``roi_crop`` crops each sign's ROI box."""
    source = Path(source)
    rows: list[tuple[Path, int, tuple | None]] = []
    if split == "train":
        images_dir = source / "Final_Training" / "Images"
        if not images_dir.is_dir():
            raise FileNotFoundError(f"{images_dir}: no such directory")
        for folder in sorted(p for p in images_dir.iterdir() if p.is_dir()):
            gt = folder / f"GT-{folder.name}.csv"
            if not gt.is_file():
                raise FileNotFoundError(f"{gt}: missing ground-truth CSV for class folder {folder.name}")
            rows += _read_csv(gt, folder, roi_crop)
    else:
        images_dir = source / "Final_Test" / "Images"
        candidates = [images_dir / TEST_CSV, source / "Final_Test" / TEST_CSV, source / TEST_CSV]
        gt = next((p for p in candidates if p.is_file()), None)
        if gt is None:
            raise FileNotFoundError(
                f"{source}: no {TEST_CSV} (the test set's ground truth) in Final_Test/Images or here"
            )
        rows = _read_csv(gt, images_dir, roi_crop)
    if not rows:
        raise ValueError(f"{source}: no images listed for {split}")
    missing = [str(path) for path, _, _ in rows if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed image(s) missing, e.g. {missing[0]}")
    files, labels, boxes = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows] if roi_crop else None
    files, labels, boxes, unreadable = drop_unreadable(files, labels, boxes, num_workers, strict, f"checking {split}")
    if not files:
        raise ValueError(f"{source}: no readable images for {split}")
    mean, std = sample_stats(files, boxes)
    return SourceSplit(
        format="gtsrb",
        source=str(source),
        split=split,
        images=FileImages(files, labels, boxes),
        classes={f"{i:05d}": i for i in range(NUM_CLASSES)},
        channels=3,
        mean=mean,
        std=std,
        skipped={"unreadable": unreadable} if unreadable else {},
    )
