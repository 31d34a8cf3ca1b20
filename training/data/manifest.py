"""The JSON manifest written beside every ``.beton``: what the file holds and how it was made."""

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class Manifest(BaseModel):
    """Everything a loader or the service needs to know about a ``.beton`` without opening it."""

    format: str  # the writer: imagenet, idx, cifar, gtsrb
    source: str  # where the images came from
    split: str  # train, val or test
    count: int  # images written
    classes: dict[str, int]  # class name (or id, e.g. a WordNet id) → label index
    resolution: tuple[int, int]  # largest (height, width) stored
    mean: tuple[float, ...]  # per-channel pixel mean on a 0–255 scale, RGB
    std: tuple[float, ...]
    channels: int  # channels of the source images (1 for greyscale sets stored as RGB)
    options: dict[str, Any] = Field(default_factory=dict)  # writer options
    skipped: dict[str, list[str]] = Field(default_factory=dict)  # reason → files left out
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def manifest_path(beton: Path) -> Path:
    """``data/train.beton`` → ``data/train.json``."""
    return Path(beton).with_suffix(".json")


def write_atomically(path: Path, write) -> None:
    """Call ``write(temp_path)`` and rename the result onto ``path``; on any failure no file is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_manifest(manifest: Manifest, beton: Path) -> Path:
    path = manifest_path(beton)

    def write(temp: Path) -> None:
        temp.write_text(manifest.model_dump_json(indent=2) + "\n")
        temp.chmod(0o644)

    write_atomically(path, write)
    return path


def load_manifest(beton: Path) -> Manifest:
    path = manifest_path(beton)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {path} beside {beton}: write the dataset with 'san data build'")
    return Manifest.model_validate(json.loads(path.read_text()))
