"""Read a written ``.beton`` back with ffcv itself: labels from the metadata, raw pixels through a Loader."""

from pathlib import Path

import numpy as np
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import ToTensor


def read_labels(beton: Path) -> np.ndarray:
    reader = Reader(str(beton))
    return reader.metadata[f"f{reader.field_names.index('label')}"].copy()


def read_pixels(beton: Path) -> np.ndarray:
    """All images as N×H×W×3 uint8, in file order (the set must have one image size)."""
    count = len(read_labels(beton))
    loader = Loader(
        str(beton),
        batch_size=count,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    return np.concatenate([images.numpy() for images, _ in loader])
