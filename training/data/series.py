"""Time series as ``.beton`` files: classification sets in the UEA/sktime ``.ts`` format, and forecasting windows
cut from one series in a CSV.

Every record's input is a float32 ``(T, F)`` array (time × features, raw values) in the FFCV field ``series``.
A classification record's target is the int field ``label``; a forecast's is the float32 field ``target``. The
loader (`training.data.series_loader`) normalises with the train split's statistics from the manifest.

Unequal lengths across cases are legal in ``.ts`` files (JapaneseVowels: 7–29 frames). The writer pads each case
at its end to a fixed length by repeating its last time step ("edge" padding: no artificial zeros, which would be
out of range for features far from 0); a case longer than that length is refused, never cut.

Forecasting windows (`forecast_windows`) are split *in time*: the last ``val_steps`` values of the series are the
validation targets. See its docstring for the rule.
"""

import csv
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ffcv.fields import IntField, NDArrayField
from ffcv.reader import Reader
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
from pydantic import BaseModel, Field

from training.data.manifest import Manifest, save_manifest, write_atomically
from training.data.writer import evenly_spread

FLOAT32 = np.dtype(np.float32)


class SeriesOptions(BaseModel):
    """How a series set is cut. ``length``: ``.ts`` cases are padded to it (default: the longest case of both
    files). ``window``/``horizon``/``val_steps``: a forecast's input steps, predicted steps, and the held-out
    end of the series. ``target``: the CSV columns predicted (default: the last)."""

    length: int | None = Field(default=None, gt=0)
    window: int | None = Field(default=None, gt=0)
    horizon: int | None = Field(default=None, gt=0)
    val_steps: int | None = Field(default=None, gt=0)
    target: tuple[str, ...] | None = None


@dataclass
class TsFile:
    """One ``.ts`` file, read and checked: ``cases[i]`` is a float64 ``(T_i, F)`` array from line ``lines[i]``."""

    path: Path
    problem: str
    dimensions: int
    class_labels: list[str]
    cases: list[np.ndarray]
    labels: list[str]
    lines: list[int]


@dataclass
class SeriesSplit:
    """One split of a series set, read and checked, ready to write. ``targets``: int64 ``(N,)`` labels, or float32
    ``(N, horizon)`` (one target column) / ``(N, horizon, K)`` forecasts. ``mean``/``std`` (per feature) and
    ``target_mean``/``target_std`` (per target column) are the *train* split's, in both splits."""

    format: str
    source: str
    split: str
    task: str
    inputs: np.ndarray
    targets: np.ndarray
    classes: dict[str, int]
    features: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    horizon: int | None = None
    target_names: tuple[str, ...] = ()
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


# --- the .ts format -------------------------------------------------------------------------------------------


def _problem(path: Path, line: int, case: int | None, text: str) -> ValueError:
    where = f"line {line}" + (f" (case {case})" if case is not None else "")
    return ValueError(f"{path}: {where}: {text}")


def _numbers(path: Path, line: int, case: int, dimension: int, text: str) -> list[float]:
    tokens = [token.strip() for token in text.split(",")]
    if tokens == [""]:
        raise _problem(path, line, case, f"dimension {dimension} is empty")
    values = []
    for step, token in enumerate(tokens, start=1):
        try:
            value = float(token)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            values.append(value)
            continue
        where = f"at step {step} of dimension {dimension}"
        if value is None and token not in ("?", ""):
            raise _problem(path, line, case, f"unparsable number {token[:20]!r} {where}")
        raise _problem(path, line, case, f"missing value {token[:20]!r} {where} (missing values are not supported)")
    return values


def read_ts(path: Path) -> TsFile:
    """A UEA/sktime ``.ts`` classification file: ``@`` header lines up to ``@data``, then one case a line, its
    dimensions separated by ``:``, their values by ``,``, the class label last. Any problem is a `ValueError`
    naming the file, the line and the case."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable .ts file ({error})") from error
    header: dict[str, str] = {}
    cases: list[np.ndarray] = []
    labels: list[str] = []
    lines: list[int] = []
    in_data = False
    dimensions = class_labels = series_length = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise _problem(path, number, None, f"{line[:30]!r} before @data (header lines start with @)")
            key, _, value = line[1:].partition(" ")
            key, value = key.lower(), value.strip()
            if key == "data":
                in_data = True
                dimensions, class_labels, series_length = _check_header(path, number, header)
            else:
                header[key] = value
            continue
        case = len(cases) + 1
        *parts, label = line.split(":")
        expected = dimensions or (cases[0].shape[1] if cases else None)
        if not parts:
            raise _problem(path, number, case, "no ':' between the values and the class label")
        if expected is not None and len(parts) != expected:
            source = "@dimensions" if dimensions else "the first case"
            raise _problem(path, number, case, f"{len(parts)} dimensions, expected {expected} ({source})")
        label = label.strip()
        if label not in class_labels:
            raise _problem(path, number, case, f"label {label[:30]!r} is not in @classLabel {' '.join(class_labels)}")
        series = [_numbers(path, number, case, d + 1, part) for d, part in enumerate(parts)]
        lengths = [len(s) for s in series]
        if len(set(lengths)) > 1:
            raise _problem(path, number, case, f"ragged: its dimensions have different lengths {lengths}")
        if series_length is not None and lengths[0] != series_length:
            raise _problem(path, number, case, f"{lengths[0]} steps, but @seriesLength is {series_length}")
        cases.append(np.stack(series, axis=1))
        labels.append(label)
        lines.append(number)
    if not in_data:
        raise ValueError(f"{path}: no @data line (a .ts file's cases follow @data)")
    if not cases:
        raise ValueError(f"{path}: no cases after @data")
    return TsFile(path, header.get("problemname", path.stem), cases[0].shape[1], class_labels, cases, labels, lines)


def _check_header(path: Path, line: int, header: dict[str, str]) -> tuple[int | None, list[str], int | None]:
    """``@dimensions`` (None: the first case decides), the ``@classLabel`` names, and ``@seriesLength`` when
    ``@equalLength true`` promises one."""
    if header.get("timestamps", "false").lower() == "true":
        raise _problem(path, line, None, "@timeStamps true is not supported (values only)")
    if "targetlabel" in header:
        raise _problem(path, line, None, "@targetLabel (regression) files are not supported: classification only")
    flag, _, names = header.get("classlabel", "").partition(" ")
    if flag.lower() != "true" or not names.split():
        raise _problem(path, line, None, "no class labels (needs '@classLabel true <label> ...')")
    dimensions = series_length = None
    for key in ("dimensions", "serieslength"):
        if key in header:
            try:
                value = int(header[key])
            except ValueError:
                raise _problem(path, line, None, f"@{key} {header[key][:20]!r} is not a whole number") from None
            if value < 1:
                raise _problem(path, line, None, f"@{key} {value} is not positive")
            if key == "dimensions":
                dimensions = value
            elif header.get("equallength", "").lower() == "true":
                series_length = value
    if dimensions is None and header.get("univariate", "").lower() == "true":
        dimensions = 1
    return dimensions, names.split(), series_length


def pad_cases(data: TsFile, length: int) -> np.ndarray:
    """``(N, length, F)`` float32: every case edge-padded at its end (its last step repeated); a longer case is
    refused, naming it."""
    out = np.empty((len(data.cases), length, data.dimensions), dtype=np.float32)
    for index, (case, line) in enumerate(zip(data.cases, data.lines, strict=True)):
        if len(case) > length:
            raise _problem(data.path, line, index + 1, f"{len(case)} steps, longer than the set's length {length}")
        out[index, : len(case)] = case
        out[index, len(case) :] = case[-1]
    return out


def find_ts_files(source: Path) -> tuple[Path, Path]:
    """The ``*_TRAIN.ts`` and ``*_TEST.ts`` file in ``source`` (one of each)."""
    found = {}
    for split in ("TRAIN", "TEST"):
        files = sorted(p for p in Path(source).iterdir() if p.is_file() and p.name.upper().endswith(f"_{split}.TS"))
        if len(files) != 1:
            names = ", ".join(p.name for p in files) or "none"
            raise ValueError(f"{source}: expected one *_{split}.ts file, found {names}")
        found[split] = files[0]
    return found["TRAIN"], found["TEST"]


def feature_stats(values: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-feature (last axis) mean and std in float64; a constant feature gets std 1, so normalising it gives 0
    rather than a division by zero."""
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def read_ts_splits(source: Path, options: SeriesOptions, subset: int | None = None) -> list[SeriesSplit]:
    """The train (``*_TRAIN.ts``) and val (``*_TEST.ts``) splits of a ``.ts`` directory, padded to
    ``options.length``. The statistics are the train split's, over the stored (padded) values: what the model
    sees is then zero-mean and unit-std per feature."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    train, test = (read_ts(path) for path in find_ts_files(source))
    if test.dimensions != train.dimensions:
        raise ValueError(f"{test.path}: {test.dimensions} dimensions, but {train.path.name} has {train.dimensions}")
    classes = {label: index for index, label in enumerate(train.class_labels)}
    for case, (label, line) in enumerate(zip(test.labels, test.lines, strict=True), start=1):
        if label not in classes:
            raise _problem(test.path, line, case, f"label {label!r} is not among the train file's classes")
    length = options.length or max(len(case) for data in (train, test) for case in data.cases)
    padded = {}
    for split, data in (("train", train), ("val", test)):
        inputs = pad_cases(data, length)
        labels = np.array([classes[label] for label in data.labels], dtype=np.int64)
        if subset is not None:
            keep = evenly_spread(len(labels), subset)
            inputs, labels = inputs[keep], labels[keep]
        padded[split] = inputs, labels, data
    mean, std = feature_stats(padded["train"][0])
    features = tuple(f"dim_{d}" for d in range(train.dimensions))
    return [
        SeriesSplit(
            format="ts", source=str(data.path), split=split, task="classification", inputs=inputs, targets=labels,
            classes=classes, features=features, mean=mean, std=std,
            options={"length": length, "padding": "edge", "longest": max(len(c) for c in data.cases)},
        )
        for split, (inputs, labels, data) in padded.items()
    ]  # fmt: skip


# --- forecasting ----------------------------------------------------------------------------------------------


@dataclass
class CsvSeries:
    path: Path
    stamps: list[str]  # the first column: the time index
    columns: list[str]  # the other columns: the features
    values: np.ndarray  # float64 (S, F)


def read_series_csv(path: Path) -> CsvSeries:
    """A CSV with a header row: the first column is the time index (kept as text), every other column a numeric
    feature, one row per time step, oldest first. Missing or unparsable values are refused, naming the line."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from error
    if not rows or len(rows[0]) < 2:
        raise ValueError(f"{path}: line 1: needs a header row of a time column and at least one value column")
    header, stamps, values = [name.strip() for name in rows[0]], [], []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}: line {number}: {len(row)} columns, the header has {len(header)}")
        numbers = []
        for name, cell in zip(header[1:], row[1:], strict=True):
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"{path}: line {number}: unparsable number {cell[:20]!r} in column {name}") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}: line {number}: missing value {cell[:20]!r} in column {name}")
            numbers.append(value)
        stamps.append(row[0].strip())
        values.append(numbers)
    if not values:
        raise ValueError(f"{path}: no rows after the header")
    return CsvSeries(path, stamps, header[1:], np.array(values, dtype=np.float64))


@dataclass
class Windows:
    inputs: np.ndarray  # (N, window, F)
    targets: np.ndarray  # (N, horizon, K)
    starts: np.ndarray  # (N,) the series step of each target's first value


def forecast_windows(
    series: np.ndarray, window: int, horizon: int, val_steps: int, targets: Sequence[int]
) -> tuple[Windows, Windows]:
    """Train and val windows of ``series`` ``(S, F)``, stride 1, split in time at ``split = S - val_steps``.

    A window's input is ``series[t - window : t]`` and its target ``series[t : t + horizon, targets]``: the input
    ends right before the target starts, so no input holds a value from its own target's future.
    - train: every ``t`` with ``t - window >= 0`` and ``t + horizon <= split`` — input and target lie entirely
      before the split: ``split - window - horizon + 1`` windows.
    - val: every ``t`` with ``split <= t`` and ``t + horizon <= S`` — the target lies entirely at/after the split;
      its input may reach back before it (the past is known at forecast time): ``val_steps - horizon + 1``
      windows (their targets overlap: a rolling forecast origin).
    So no val target value appears in any train window, input or target.
    """
    steps = len(series)
    split = steps - val_steps
    if val_steps < horizon:
        raise ValueError(f"val_steps {val_steps} < horizon {horizon}: no validation window would fit")
    if split < window + horizon:
        raise ValueError(f"{steps} steps leave {split} before the held-out {val_steps}: too few for one train "
                         f"window of {window} + {horizon}")  # fmt: skip
    columns = list(targets)

    def cut(starts: range) -> Windows:
        starts_array = np.array(starts, dtype=np.int64)
        inputs = np.stack([series[t - window : t] for t in starts])
        outputs = np.stack([series[t : t + horizon][:, columns] for t in starts])
        return Windows(inputs, outputs, starts_array)

    return cut(range(window, split - horizon + 1)), cut(range(split, steps - horizon + 1))


def find_csv(source: Path) -> Path:
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such file or directory")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".csv")
    if len(files) != 1:
        raise ValueError(f"{source}: expected one .csv file, found {', '.join(p.name for p in files) or 'none'}")
    return files[0]


def read_forecast_splits(source: Path, options: SeriesOptions) -> list[SeriesSplit]:
    """Train and val windows (`forecast_windows`) of the CSV series at ``source`` (the file, or a directory
    holding one). Statistics come from the train part of the series only, ``series[:split]``: nothing from the
    validation period leaks into the normalisation."""
    missing = [name for name in ("window", "horizon", "val_steps") if getattr(options, name) is None]
    if missing:
        raise ValueError(f"forecast-csv needs {', '.join('--' + name.replace('_', '-') for name in missing)}")
    data = read_series_csv(find_csv(source))
    names = options.target or (data.columns[-1],)
    unknown = [name for name in names if name not in data.columns]
    if unknown:
        raise ValueError(f"{data.path}: no column {', '.join(unknown)}; the columns are {', '.join(data.columns)}")
    columns = [data.columns.index(name) for name in names]
    try:
        train, val = forecast_windows(data.values, options.window, options.horizon, options.val_steps, columns)
    except ValueError as error:
        raise ValueError(f"{data.path}: {error}") from None
    split = len(data.values) - options.val_steps
    mean, std = feature_stats(data.values[:split])
    target_mean, target_std = tuple(mean[c] for c in columns), tuple(std[c] for c in columns)
    splits = []
    for name, windows in (("train", train), ("val", val)):
        targets = windows.targets.astype(np.float32)
        first, last = int(windows.starts[0]), int(windows.starts[-1]) + options.horizon - 1
        splits.append(
            SeriesSplit(
                format="forecast-csv", source=str(data.path), split=name, task="forecast",
                inputs=windows.inputs.astype(np.float32), targets=targets[..., 0] if len(columns) == 1 else targets,
                classes={}, features=tuple(data.columns), mean=mean, std=std, horizon=options.horizon,
                target_names=tuple(names), target_mean=target_mean, target_std=target_std,
                options={"window": options.window, "horizon": options.horizon, "val_steps": options.val_steps,
                         "split_step": split, "target_steps": [first, last],
                         "target_stamps": [data.stamps[first], data.stamps[last]], "stride": 1},
            )
        )  # fmt: skip
    return splits


# --- writing --------------------------------------------------------------------------------------------------


class _Records:
    """``records[i]`` = (input, target) as the DatasetWriter takes them."""

    def __init__(self, split: SeriesSplit) -> None:
        self.inputs = np.ascontiguousarray(split.inputs, dtype=np.float32)
        self.classification = split.task == "classification"
        self.targets = split.targets if self.classification else np.ascontiguousarray(split.targets, np.float32)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any]:
        target = self.targets[index]
        return self.inputs[index], int(target) if self.classification else target


def write_series_beton(split: SeriesSplit, out: Path, num_workers: int = 1) -> Manifest:
    """Write ``split`` to ``out`` (a temp file renamed into place) and its manifest; print a summary line."""
    out = Path(out)
    records = _Records(split)
    if len(records) == 0:
        raise ValueError(f"no records to write for {split.source} ({split.split})")
    started = time.perf_counter()
    steps, features = records.inputs.shape[1:]
    fields = {"series": NDArrayField(FLOAT32, (steps, features))}
    if records.classification:
        fields["label"] = IntField()
    else:
        fields["target"] = NDArrayField(FLOAT32, records.targets.shape[1:])

    # ffcv's default 8 MiB page would make a 40-record set a 16 MiB file; a page need only hold a record
    page = MIN_PAGE_SIZE
    while page < 2 * (records.inputs[0].nbytes + np.asarray(records.targets[0]).nbytes):
        page *= 2

    def write(temp: Path) -> None:
        workers = max(1, min(num_workers, math.ceil(len(records) / 100)))  # tiny sets: no process pool
        writer = DatasetWriter(str(temp), fields, page_size=page, num_workers=workers)
        writer.from_indexed_dataset(records, chunksize=100)
        reader = Reader(str(temp))  # read back before the rename: a file that does not check out never lands
        if reader.num_samples != len(records):
            raise RuntimeError(f"{temp}: wrote {reader.num_samples} records for {len(records)}")
        temp.chmod(0o644)

    write_atomically(out, write)
    manifest = Manifest(
        format=split.format, source=split.source, split=split.split, count=len(records), classes=split.classes,
        resolution=(steps, features), mean=split.mean, std=split.std, channels=features, options=split.options,
        kind="series", task=split.task, shape=(steps, features), features=split.features, horizon=split.horizon,
        targets=split.target_names, target_mean=split.target_mean, target_std=split.target_std,
    )  # fmt: skip
    save_manifest(manifest, out)
    what = f"{manifest.num_classes} classes" if records.classification else f"→ {split.horizon} steps"
    print(f"{out}: {manifest.count:,} series ({steps}×{features}), {what}, {out.stat().st_size / 2**10:.0f} KiB, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    return manifest


def build_series(
    format: str, source: Path, out: Path, options: SeriesOptions, num_workers: int = 1, subset: int | None = None
) -> dict[str, Manifest]:
    """Write ``out/train.beton`` and ``out/val.beton`` of a series set; both splits are read and checked before
    either is written, so a bad file leaves nothing behind."""
    if format == "ts":
        splits = read_ts_splits(source, options, subset)
    elif format == "forecast-csv":
        if subset is not None:
            raise ValueError("--subset does not apply to forecasting windows (it would break the time order)")
        splits = read_forecast_splits(source, options)
    else:
        raise ValueError(f"unknown series format {format!r}")
    return {data.split: write_series_beton(data, Path(out) / f"{data.split}.beton", num_workers) for data in splits}
