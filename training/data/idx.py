"""MNIST / Fashion-MNIST IDX files (gzip or raw): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""

import gzip
from pathlib import Path

import numpy as np

from training.data.writer import ArrayImages, SourceSplit, array_blocks, channel_stats

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
SPLIT_PREFIX = {"train": "train", "val": "t10k"}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array in one IDX file; the magic number and the big-endian dimensions are checked."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable IDX file ({error})") from error
    if len(data) < 8 or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise ValueError(f"{path}: IDX magic number {found}, expected {magic}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} bytes of data for dimensions {dims} (truncated?)")
    return body.reshape(dims)


def find_file(source: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte", f"{prefix}-{kind}.ubyte"):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"{source}: no {prefix}-{kind}-ubyte[.gz] file")


class GreyAsRGB(ArrayImages):
    """N×H×W greyscale arrays served as H×W×3 RGB images (FFCV stores RGB)."""

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.repeat(self.images[index][..., None], 3, axis=2), int(self.labels[index])


def read_idx_split(
    source: Path, split: str, class_names: list[str] | None = None, classes: dict[str, int] | None = None
) -> SourceSplit:
    """One split (``train`` or ``val`` = the t10k files) of an IDX dataset directory; ``classes`` (the train
    split's) labels the val split, else ``class_names`` or the label numbers name the classes."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    prefix = SPLIT_PREFIX[split]
    images = read_idx(find_file(source, prefix, "images-idx3"), IMAGES_MAGIC)
    labels = read_idx(find_file(source, prefix, "labels-idx1"), LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels in the {prefix} files")
    if len(images) == 0:
        raise ValueError(f"{source}: the {prefix} files hold no images")
    if classes is None:
        names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
        classes = {name: i for i, name in enumerate(names)}
    if labels.max() >= len(classes):
        raise ValueError(f"{source}: label {labels.max()} in the {prefix} files, but only {len(classes)} classes")
    mean, std = channel_stats(array_blocks(images))
    return SourceSplit(
        format="idx",
        source=str(source),
        split=split,
        images=GreyAsRGB(images, labels),
        classes=classes,
        channels=1,
        mean=mean * 3,
        std=std * 3,
    )
