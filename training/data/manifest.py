"""The JSON manifest written beside every ``.beton``: what the file holds and how it was made."""

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field


class Manifest(BaseModel):
    """Everything a loader or the service needs to know about a ``.beton`` without opening it.

    Images (``kind="image"``, the default, so manifests written before series existed still load): ``mean`` and
    ``std`` are this split's per-channel pixel statistics. Series (``kind="series"``, `training.data.series`): each
    record is a float32 ``shape`` = (steps T, features F) array; ``channels`` is F and ``resolution`` repeats
    ``shape``; ``mean``/``std`` are the *train* split's per-feature statistics in both splits' manifests (the val
    loader must normalise with them). A forecast's record holds the next ``horizon`` steps of the ``targets``
    columns, normalised with ``target_mean``/``target_std`` (also the train part's), so predictions can be turned
    back into the data's units. `num_classes` is the number of model outputs either way.
    """

    format: str  # the writer: imagenet, idx, cifar, gtsrb, ts, forecast-csv
    source: str  # where the images came from
    split: str  # train, val or test
    count: int  # images (series: records) written
    classes: dict[str, int]  # class name (or id, e.g. a WordNet id) → label index; empty for forecasts
    resolution: tuple[int, int]  # largest (height, width) stored; series: (T, F) as ``shape``
    mean: tuple[float, ...]  # per-channel pixel mean on a 0–255 scale, RGB; series: per feature, raw units
    std: tuple[float, ...]
    channels: int  # channels of the source images (1 for greyscale sets stored as RGB); series: features F
    options: dict[str, Any] = Field(default_factory=dict)  # writer options
    skipped: dict[str, list[str]] = Field(default_factory=dict)  # reason → files left out
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    kind: Literal["image", "series"] = "image"
    task: Literal["classification", "forecast"] = "classification"
    shape: tuple[int, int] | None = None  # series: (steps T, features F) of each record's input
    features: tuple[str, ...] = ()  # series: the feature (column) names, F of them
    horizon: int | None = None  # forecast: steps predicted
    targets: tuple[str, ...] = ()  # forecast: the predicted feature names, K of them
    target_mean: tuple[float, ...] = ()  # forecast: per target, the train part's, raw units
    target_std: tuple[float, ...] = ()

    @property
    def num_classes(self) -> int:
        """Model outputs: classes, or for a forecast ``horizon`` × targets."""
        if self.task == "forecast":
            return (self.horizon or 0) * len(self.targets)
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
