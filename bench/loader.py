"""FFCV vs a PIL + torch DataLoader over the same JPEG ImageFolder tree, and the raw JPEG decode rate.

Both loaders do the same work, each the idiomatic way: random-resized crop, horizontal flip and normalisation to
float32 inside the loader's workers (FFCV: its pipeline threads; PIL: the DataLoader's processes, as torchvision's
ToTensor + Normalize would), same batch size and worker count; images/s after a warm-up epoch (FFCV's first
epoch pays numba JIT compilation).
The raw rate is 2 processes doing nothing but decode the same files with PIL: the machine's limit for this data.

Two trees: real Fashion-MNIST upscaled to 64 px, and an ImageNet-like tree of random crops (up to 400×350) of the
colour photos scikit-image bundles, whose JPEG sizes resemble ImageNet's.

    python bench/loader.py [--images 4000] [--workers 2] [--epochs 4] [--quick] [--json PATH]
"""

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader, Dataset

from training.data.build import build_dataset
from training.data.idx import read_idx_split
from training.data.loaders import make_loader
from training.data.writer import WriterOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import Row, measured, parse_args, this_command, write_rows

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_fashion_tree(root: Path, count: int, side: int = 64) -> None:
    split = read_idx_split(FASHION_MNIST, "train")
    for index in np.linspace(0, len(split.images) - 1, count).astype(int):
        image, label = split.images[int(index)]
        folder = root / "train" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((side, side), Image.BILINEAR).save(folder / f"{index}.JPEG", quality=90)


def write_photo_tree(root: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    photos = [getattr(skdata, name)() for name in PHOTOS]
    for index in range(count):
        label = index % len(photos)
        photo = photos[label]
        height, width = rng.randint(120, min(350, photo.shape[0])), rng.randint(120, min(400, photo.shape[1]))
        top, left = rng.randint(0, photo.shape[0] - height), rng.randint(0, photo.shape[1] - width)
        folder = root / "train" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        crop = np.ascontiguousarray(photo[top : top + height, left : left + width, :3])
        Image.fromarray(crop).save(folder / f"{index}.JPEG", quality=90)


def add_val_split(root: Path) -> None:
    """The writer builds train and val: give val one image per class (only train is timed)."""
    for folder in (root / "train").iterdir():
        target = root / "val" / folder.name
        target.mkdir(parents=True)
        first = next(folder.glob("*.JPEG"))
        (target / first.name).write_bytes(first.read_bytes())


def jpeg_files(root: Path) -> list[tuple[Path, int]]:
    folders = sorted((root / "train").iterdir())
    return [(path, label) for label, folder in enumerate(folders) for path in sorted(folder.glob("*.JPEG"))]


class PILFolder(Dataset):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip, by hand (torchvision cannot sit beside our torch)."""

    def __init__(self, files: list[tuple[Path, int]], size: int, mean, std) -> None:
        self.files, self.size = files, size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.inverse_std = 1 / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * random.uniform(0.08, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                return left, top, left + w, top + h
        return 0, 0, width, height

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
            image = image.resize((self.size, self.size), Image.BILINEAR, box=self.crop_box(*image.size))
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return pixels.float().sub_(self.mean).mul_(self.inverse_std), label


def images_per_second(loader, epochs: int) -> list[float]:
    """Images/s of each of ``epochs`` epochs after one warm-up epoch."""
    for _ in loader:
        pass
    rates = []
    for _ in range(epochs):
        count, started = 0, time.perf_counter()
        for images, _ in loader:
            count += len(images)
        rates.append(count / (time.perf_counter() - started))
    return rates


def _decode(path: Path) -> int:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).shape[0]


def raw_decode_rate(files: list[Path], workers: int, repeats: int) -> list[float]:
    rates = []
    with get_context("fork").Pool(workers) as pool:
        pool.map(_decode, files[:64])
        for _ in range(repeats):
            started = time.perf_counter()
            pool.map(_decode, files, chunksize=32)
            rates.append(len(files) / (time.perf_counter() - started))
    return rates


def compare(name: str, root: Path, out: Path, size: int, args) -> dict:
    add_val_split(root)
    build_dataset("imagenet", root, out, WriterOptions(num_workers=args.workers, write_mode="jpg", jpeg_quality=90))
    files = jpeg_files(root)
    ffcv = make_loader(out / "train.beton", train=True, batch_size=args.batch_size, resolution=size,
                       crop="random-resized", num_workers=args.workers)  # fmt: skip
    ffcv_rate = images_per_second(ffcv, args.epochs)
    dataset = PILFolder(files, size, ffcv.manifest.mean, ffcv.manifest.std)
    pil = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                     num_workers=args.workers, persistent_workers=True)  # fmt: skip
    pil_rate = images_per_second(pil, args.epochs)
    raw = raw_decode_rate([path for path, _ in files], args.workers, args.epochs)
    mean_kib = sum(path.stat().st_size for path, _ in files) / len(files) / 1024
    return {
        "tree": name,
        "images": len(files),
        "kib": mean_kib,
        "size": size,
        "ffcv": ffcv_rate,
        "pil": pil_rate,
        "raw": raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    args = parse_args(parser, quick={"images": 2000, "epochs": 3})
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        write_fashion_tree(temp / "fashion", args.images)
        rows.append(compare("Fashion-MNIST, 64 px JPEG", temp / "fashion", temp / "fashion-beton", 64, args))
        write_photo_tree(temp / "photos", args.images)
        rows.append(compare("skimage photos ≤ 400×350 JPEG", temp / "photos", temp / "photos-beton", 224, args))
    print(f"\n{args.workers} workers, batch {args.batch_size}, {args.epochs} epochs after a warm-up epoch\n")
    print("| tree | images | mean JPEG KiB | output px | FFCV img/s | PIL DataLoader img/s | FFCV × PIL "
          "| raw decode img/s | FFCV / raw |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ffcv, pil, raw = (statistics.median(r[key]) for key in ("ffcv", "pil", "raw"))
        print(f"| {r['tree']} | {r['images']:,} | {r['kib']:.1f} | {r['size']} | {ffcv:,.0f} | {pil:,.0f} "
              f"| {ffcv / pil:.2f} | {raw:,.0f} | {ffcv / raw:.2f} |")  # fmt: skip
    if args.json:
        write_rows(args.json, report_rows(rows, args))


def report_rows(rows: list[dict], args) -> list[Row]:
    """Per tree: FFCV against the PIL DataLoader and against the raw decode rate, and both of those; medians of
    the epochs (the raw rate: of as many passes) with their min–max."""
    out, command = [], this_command()
    setup = f"{args.workers} workers, batch {args.batch_size}"
    for r in rows:
        tree, about = f"{r['size']} px", f"{r['tree']}: {r['images']:,} images, mean JPEG {r['kib']:.1f} KiB"
        ffcv, pil, raw = (statistics.median(r[key]) for key in ("ffcv", "pil", "raw"))
        out += [
            measured("loader", f"{tree} · FFCV vs PIL", r["ffcv"], "img/s", baseline="PIL DataLoader, same work",
                     ratio=ffcv / pil, note=f"{about}; {setup}", command=command),
            measured("loader", f"{tree} · FFCV vs raw decode", r["ffcv"], "img/s", ratio=ffcv / raw,
                     baseline=f"raw PIL decode, {args.workers} processes", note="the machine's decode limit",
                     command=command),
            measured("loader", f"{tree} · PIL DataLoader", r["pil"], "img/s", command=command),
            measured("loader", f"{tree} · raw PIL decode", r["raw"], "img/s", command=command),
        ]  # fmt: skip
    return out


if __name__ == "__main__":
    main()
