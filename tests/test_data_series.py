"""Time-series .beton files: forecasting windows split in time, the real sktime sets (BasicMotions, JapaneseVowels,
Airline), their loaders, and bad .ts files refused naming the file and the case, leaving nothing behind."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.ndarray import NDArrayDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import ToTensor

from tests.formats import write_idx
from tests.readback import read_labels
from training.config import DataSection, JobSpec
from training.data.build import build_dataset
from training.data.catalog import dataset_info, sktime_data
from training.data.loaders import ImageLoader
from training.data.manifest import Manifest, load_manifest
from training.data.resolve import resolve_data
from training.data.series import SeriesOptions
from training.data.series_loader import SeriesLoader, make_any_loader, make_series_loader
from training.data.writer import WriterOptions

pytestmark = pytest.mark.timeout(300, method="thread")
needs_sktime = pytest.mark.skipif(sktime_data("BasicMotions") is None, reason="sktime's data files are not installed")
OPTIONS = WriterOptions(num_workers=1)
SAN = str(Path(sys.executable).with_name("san"))


def read_records(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every record's raw fields, in file order, through ffcv itself: (inputs, labels or targets)."""
    reader = Reader(str(beton))
    decoders = {
        name: [IntDecoder() if name == "label" else NDArrayDecoder(), ToTensor()] for name in reader.field_names
    }
    loader = Loader(str(beton), batch_size=reader.num_samples, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines=decoders)  # fmt: skip
    inputs, targets = next(iter(loader))
    return inputs.numpy().copy(), targets.numpy().copy()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


def write_csv(path: Path, header: list[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


# --- forecasting windows --------------------------------------------------------------------------------------


def test_forecast_windows_split_in_time_with_no_future_in_any_input(tmp_path):
    steps, window, horizon, val_steps = 60, 8, 4, 12
    write_csv(tmp_path / "src" / "series.csv", ["step", "value"], [(f"t{t}", t) for t in range(steps)])
    series = SeriesOptions(window=window, horizon=horizon, val_steps=val_steps)
    manifests = build_dataset("forecast-csv", tmp_path / "src", tmp_path / "out", OPTIONS, series=series)
    split = steps - val_steps
    train_x, train_y = read_records(tmp_path / "out" / "train.beton")
    val_x, val_y = read_records(tmp_path / "out" / "val.beton")
    # documented counts: every train window before the split, every val target start from the split on
    assert len(train_x) == manifests["train"].count == split - window - horizon + 1 == 37
    assert len(val_x) == manifests["val"].count == val_steps - horizon + 1 == 9
    assert train_x.shape[1:] == val_x.shape[1:] == (window, 1) and train_y.shape[1:] == (horizon,)
    assert train_x.max() < split and train_y.max() < split
    assert val_y.min() >= split and val_y.max() == steps - 1
    train_values = set(train_x.ravel().tolist()) | set(train_y.ravel().tolist())
    assert train_values.isdisjoint(val_y.ravel().tolist())
    for inputs, targets in ((train_x, train_y), (val_x, val_y)):
        start = targets[:, 0]
        assert np.array_equal(inputs[..., 0], start[:, None] + np.arange(-window, 0))  # ends right before the target
        assert np.array_equal(targets, start[:, None] + np.arange(horizon))
    assert np.array_equal(train_y[:, 0], np.arange(window, split - horizon + 1))  # stride 1, none missed
    assert np.array_equal(val_y[:, 0], np.arange(split, steps - horizon + 1))
    assert val_x.min() < split  # a val window's input may reach back before the split: the known past
    for manifest in manifests.values():  # statistics from the train part of the series only
        assert manifest.mean == pytest.approx((np.arange(split).mean(),))
        assert manifest.std == pytest.approx((np.arange(split).std(),))
        assert manifest.target_mean == manifest.mean and manifest.num_classes == horizon and manifest.channels == 1
        assert manifest.kind == "series" and manifest.task == "forecast" and manifest.shape == (window, 1)
    assert manifests["val"].options["target_stamps"] == [f"t{split}", f"t{steps - 1}"]


def test_multivariate_forecast_targets_named_columns_flattened_time_major(tmp_path):
    rows = [(f"t{t}", t, -t, 100 + t) for t in range(40)]
    write_csv(tmp_path / "src.csv", ["step", "a", "b", "c"], rows)
    one = SeriesOptions(window=5, horizon=3, val_steps=6, target=("b",))
    build_dataset("forecast-csv", tmp_path / "src.csv", tmp_path / "one", OPTIONS, series=one)
    inputs, targets = read_records(tmp_path / "one" / "train.beton")
    assert inputs.shape[1:] == (5, 3) and targets.shape[1:] == (3,)
    assert np.array_equal(targets, -(inputs[:, -1:, 0] + 1 + np.arange(3)))
    two = SeriesOptions(window=5, horizon=3, val_steps=6, target=("a", "c"))
    manifests = build_dataset("forecast-csv", tmp_path / "src.csv", tmp_path / "two", OPTIONS, series=two)
    assert manifests["train"].num_classes == 6 and manifests["train"].targets == ("a", "c")
    assert read_records(tmp_path / "two" / "train.beton")[1].shape[1:] == (3, 2)
    loader = make_series_loader(tmp_path / "two" / "val.beton", train=False, batch_size=4)
    inputs, batch, level = next(iter(loader.with_levels()))
    raw = loader.denormalize(batch, level)
    assert torch.all(inputs[:, -1] == 0)  # every feature relative to the window's last step
    assert batch.shape == (4, 6)
    assert torch.allclose(raw[0], torch.tensor([34.0, 134, 35, 135, 36, 136]))  # step by step, a then c
    with pytest.raises(ValueError, match=r"no column d; the columns are a, b, c"):
        build_dataset("forecast-csv", tmp_path / "src.csv", tmp_path / "bad", OPTIONS,
                      series=SeriesOptions(window=5, horizon=3, val_steps=6, target=("d",)))  # fmt: skip


# --- the real sets --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("series")
    for name in ("basic-motions", "japanese-vowels", "airline"):
        build_dataset(name, None, root / name, OPTIONS)
    return root


@needs_sktime
@pytest.mark.parametrize(
    ("name", "shape", "counts", "classes"),
    [
        ("basic-motions", (100, 6), (40, 40), ["Standing", "Running", "Walking", "Badminton"]),
        ("japanese-vowels", (29, 12), (270, 370), [str(i) for i in range(1, 10)]),
    ],
)
def test_real_classification_sets_build_with_their_shapes_counts_and_labels(built, name, shape, counts, classes):
    info = dataset_info(name)
    assert (info.resolution, info.channels, info.num_classes) == (shape[0], shape[1], len(classes))
    assert DataSection(dataset=name).shape() == (len(classes), shape[1])
    for split, count in zip(("train", "val"), counts, strict=True):
        beton = built / name / f"{split}.beton"
        manifest = load_manifest(beton)
        assert (manifest.count, manifest.shape, manifest.resolution) == (count, shape, shape)
        assert list(manifest.classes) == classes and manifest.num_classes == len(classes)
        assert manifest.channels == shape[1] and manifest.kind == "series" and manifest.task == "classification"
        inputs, labels = read_records(beton)
        assert inputs.shape == (count, *shape) and inputs.dtype == np.float32
        assert np.array_equal(labels[:, 0], read_labels(beton))
        assert set(labels[:, 0].tolist()) == set(range(len(classes)))
    train, val = (load_manifest(built / name / f"{split}.beton") for split in ("train", "val"))
    assert val.mean == train.mean and val.std == train.std  # the val loader normalises with the train split's


def raw_ts_cases(path: Path) -> list[tuple[np.ndarray, str]]:
    lines = path.read_text().splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1 :]
    cases = []
    for line in filter(str.strip, body):
        *dims, label = line.split(":")
        cases.append((np.array([[float(v) for v in d.split(",")] for d in dims]).T, label))
    return cases


@needs_sktime
def test_japanese_vowels_cases_are_edge_padded_to_29_steps(built):
    cases = raw_ts_cases(sktime_data("JapaneseVowels") / "JapaneseVowels_TRAIN.ts")
    inputs, _ = read_records(built / "japanese-vowels" / "train.beton")
    index = next(i for i, (case, _) in enumerate(cases) if len(case) < 20)
    case = cases[index][0]
    assert np.array_equal(inputs[index, : len(case)], case.astype(np.float32))
    assert np.array_equal(inputs[index, len(case) :], np.repeat(case[-1:].astype(np.float32), 29 - len(case), 0))
    assert load_manifest(built / "japanese-vowels" / "train.beton").options["padding"] == "edge"


@needs_sktime
def test_series_loader_yields_normalised_batches_on_the_right_shapes(built):
    beton = built / "basic-motions" / "train.beton"
    everything = make_series_loader(beton, train=False, batch_size=16)
    batches = list(everything)
    assert len(batches) == len(everything) == 3 and [len(y) for _, y in batches] == [16, 16, 8]
    inputs, labels = batches[0]
    assert inputs.shape == (16, 100, 6) and inputs.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    stacked = torch.cat([x for x, _ in batches]).double()
    assert torch.allclose(stacked.mean((0, 1)), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(stacked.std((0, 1), correction=0), torch.ones(6, dtype=torch.float64), atol=1e-5)
    assert torch.cat([y for _, y in batches]).tolist() == read_labels(beton).tolist()
    train = make_any_loader(beton, train=True, batch_size=16, seed=1, in_chans=6, resolution=None, mean=(0.0,))
    assert isinstance(train, SeriesLoader) and len(train) == 2 and train.resolution == 100
    train.set_resolution(64)  # a no-op: the training loop calls it for every loader

    def labels_of(**kwargs) -> torch.Tensor:
        return torch.cat([y for _, y in make_series_loader(beton, batch_size=8, **kwargs)])

    first, again = labels_of(train=True, seed=1), labels_of(train=True, seed=1)
    assert torch.equal(first, again) and sorted(first.tolist()) == sorted(read_labels(beton).tolist())
    shards = [labels_of(train=False, shard=(rank, 3)) for rank in range(3)]
    assert [s.tolist() for s in shards] == [read_labels(beton)[rank::3].tolist() for rank in range(3)]
    with pytest.raises(ValueError, match="in_chans=3, but the series has 6 features"):
        make_any_loader(beton, train=True, batch_size=8, in_chans=3)


@needs_sktime
def test_airline_loader_targets_denormalised_are_the_csv_months(built):
    with (sktime_data("Airline") / "Airline.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    months, passengers = [r[0] for r in rows], np.array([float(r[1]) for r in rows])
    assert len(passengers) == 144
    info = dataset_info("airline")
    assert (info.resolution, info.horizon, info.val_steps, info.num_classes) == (24, 12, 24, 12)
    val = make_any_loader(built / "airline" / "val.beton", train=False, batch_size=5)
    inputs, targets, level = (torch.cat(parts) for parts in zip(*val.with_levels(), strict=True))
    assert inputs.shape == (13, 24, 1) and targets.shape == (13, 12) and targets.dtype == torch.float32
    manifest = val.manifest
    for k in range(13):  # val window k predicts months 120 + k … 131 + k (1959-01 + k) from the 24 before
        assert np.allclose(val.denormalize(targets, level)[k].numpy(), passengers[120 + k : 132 + k], atol=1e-3)
        assert np.allclose((inputs[k, :, 0] + level[k, 0]).numpy() * manifest.std[0] + manifest.mean[0],
                           passengers[96 + k : 120 + k], atol=1e-3)  # fmt: skip
        # relative to the last observed month: the inputs end at 0, the targets are changes from it
        last = passengers[119 + k]
        assert np.allclose(targets[k].numpy() * manifest.target_std[0], passengers[120 + k : 132 + k] - last,
                           atol=1e-3)  # fmt: skip
    assert manifest.options["target_stamps"] == ["1959-01", "1960-12"] and months[120] == "1959-01"
    train = make_series_loader(built / "airline" / "train.beton", train=False, batch_size=100)
    _, train_targets, train_level = next(iter(train.with_levels()))
    assert train_targets.shape == (85, 12)
    assert np.allclose(train.denormalize(train_targets, train_level)[-1].numpy(), passengers[108:120], atol=1e-3)
    assert manifest.target_mean == pytest.approx((passengers[:120].mean(),))


def test_image_manifests_written_before_series_still_load_and_dispatch_to_the_image_loader(tmp_path):
    old = {"format": "idx", "source": "x", "split": "train", "count": 3, "classes": {"a": 0, "b": 1},
           "resolution": [28, 28], "mean": [1.0, 1.0, 1.0], "std": [2.0, 2.0, 2.0], "channels": 1}  # fmt: skip
    manifest = Manifest.model_validate(old)
    assert (manifest.kind, manifest.task, manifest.num_classes, manifest.shape) == ("image", "classification", 2, None)
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "src", "train", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), np.arange(8) % 2)
    write_idx(tmp_path / "src", "t10k", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4) % 2)
    build_dataset("idx", tmp_path / "src", tmp_path / "out", OPTIONS)
    data = json.loads((tmp_path / "out" / "train.json").read_text())
    assert data["kind"] == "image"
    loader = make_any_loader(tmp_path / "out" / "train.beton", train=True, batch_size=4, in_chans=1)
    assert isinstance(loader, ImageLoader) and next(iter(loader))[0].shape == (4, 1, 28, 28)
    with pytest.raises(ValueError, match="an image set, not a series"):
        make_series_loader(tmp_path / "out" / "train.beton", train=True, batch_size=4)


# --- bad files ------------------------------------------------------------------------------------------------

HEADER = "@problemName Toy\n@timeStamps false\n@missing false\n@univariate false\n@dimensions 2\n" \
         "@equalLength false\n@classLabel true up down\n@data\n"  # fmt: skip
GOOD = ["1,2,3:4,5,6:up", "1,2:3,4:down", "7,8,9,10:1,2,3,4:up"]


def write_ts(directory: Path, test_lines: list[str], header: str = HEADER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Toy_TRAIN.ts").write_text(HEADER + "\n".join(GOOD) + "\n")
    (directory / "Toy_TEST.ts").write_text(header + "\n".join(test_lines) + "\n")
    return directory


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("1,2,3:4,5:up", r"ragged: its dimensions have different lengths \[3, 2\]"),
        ("1,?,3:4,5,6:up", r"missing value '\?' at step 2 of dimension 1"),
        ("1,2,3:4,NaN,6:up", r"missing value 'NaN' at step 2 of dimension 2"),
        ("1,2,inf:4,5,6:down", r"missing value 'inf' at step 3 of dimension 1"),
        ("1,2,3:down", r"1 dimensions, expected 2 \(@dimensions\)"),
        ("1,2,3:4,5,6:sideways", r"label 'sideways' is not in @classLabel up down"),
        ("1,2,x3:4,5,6:up", r"unparsable number 'x3' at step 3 of dimension 1"),
    ],
)
def test_bad_ts_cases_are_named_by_file_line_and_case_and_nothing_is_written(tmp_path, case, problem):
    source = write_ts(tmp_path / "src", [GOOD[0], case])
    with pytest.raises(ValueError, match=rf"Toy_TEST\.ts: line 10 \(case 2\): {problem}") as error:
        build_dataset("ts", source, tmp_path / "out", OPTIONS)
    assert "\n" not in str(error.value) and leftovers(tmp_path / "out") == []


def test_a_case_longer_than_the_length_and_a_file_without_data_are_refused(tmp_path):
    source = write_ts(tmp_path / "src", GOOD)
    with pytest.raises(ValueError, match=r"Toy_TRAIN\.ts: line 11 \(case 3\): 4 steps, longer than the set's length 3"):
        build_dataset("ts", source, tmp_path / "out", OPTIONS, series=SeriesOptions(length=3))
    assert leftovers(tmp_path / "out") == []
    (source / "Toy_TEST.ts").write_text(HEADER.replace("@data\n", "") + "1,2:3,4:up\n")
    with pytest.raises(ValueError, match=r"Toy_TEST\.ts: line 8: '1,2:3,4:up' before @data"):
        build_dataset("ts", source, tmp_path / "out", OPTIONS)
    (source / "Toy_TEST.ts").write_text(HEADER.replace("@data\n", ""))
    with pytest.raises(ValueError, match=r"Toy_TEST\.ts: no @data line"):
        build_dataset("ts", source, tmp_path / "out", OPTIONS)
    assert leftovers(tmp_path / "out") == []


def test_the_first_case_sets_the_dimensions_when_the_header_does_not(tmp_path):
    header = HEADER.replace("@dimensions 2\n", "")
    source = write_ts(tmp_path / "src", ["1,2:3,4:up", "1,2:3,4:5,6:down"], header)
    with pytest.raises(ValueError, match=r"line 9 \(case 2\): 3 dimensions, expected 2 \(the first case\)"):
        build_dataset("ts", source, tmp_path / "out", OPTIONS)


def test_a_good_toy_set_pads_to_its_longest_case(tmp_path):
    source = write_ts(tmp_path / "src", ["5,6:7,8:down"])
    manifests = build_dataset("ts", source, tmp_path / "out", OPTIONS)
    assert manifests["train"].shape == (4, 2) and manifests["val"].count == 1
    inputs, labels = read_records(tmp_path / "out" / "train.beton")
    assert inputs[1].tolist() == [[1, 3], [2, 4], [2, 4], [2, 4]] and labels[:, 0].tolist() == [0, 1, 0]


# --- the command line -----------------------------------------------------------------------------------------


@needs_sktime
def test_cli_builds_basic_motions_and_refuses_a_bad_file_in_one_line(tmp_path):
    build = subprocess.run([SAN, "data", "build", "basic-motions", "--out", str(tmp_path / "bm")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert "train.beton: 40 series (100×6), 4 classes" in build.stdout
    assert sorted(leftovers(tmp_path / "bm")) == ["train.beton", "train.json", "val.beton", "val.json"]
    info = subprocess.run([SAN, "data", "info", str(tmp_path / "bm" / "val.beton")], capture_output=True, text=True)
    assert info.returncode == 0 and "read back: 40 records (matches the manifest)" in info.stdout
    source = write_ts(tmp_path / "src", [GOOD[0], "1,2,3:4,5:up"])
    bad = subprocess.run([SAN, "data", "build", "ts", str(source), "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "Toy_TEST.ts: line 10 (case 2): ragged" in bad.stderr and leftovers(tmp_path / "bad") == []


@needs_sktime
def test_a_last_batch_of_one_keeps_its_labels_one_dimensional(built):
    batches = list(make_series_loader(built / "basic-motions" / "val.beton", train=False, batch_size=39))
    assert [tuple(y.shape) for _, y in batches] == [(39,), (1,)]


@needs_sktime
def test_explicit_files_of_the_wrong_kind_for_the_model_are_refused_before_ray(built):
    files = {"train_path": "basic-motions/train.beton", "val_path": "basic-motions/val.beton"}
    spec = JobSpec.model_validate({"model": {"name": "lenet5"}, "data": files, "training": {"batch_size": 8}})
    with pytest.raises(ValueError, match=r"model\.name: lenet5 takes images, and data\.train_path holds sequences"):
        resolve_data(spec, built)
    mixed = {"train_path": "basic-motions/train.beton", "val_path": "airline/val.beton"}
    spec = JobSpec.model_validate({"model": {"name": "lstm4"}, "data": mixed, "training": {"batch_size": 8}})
    with pytest.raises(ValueError, match=r"data\.val_path: a series forecast set, and data\.train_path a series "
                                         r"classification set"):  # fmt: skip
        resolve_data(spec, built)
    fine = JobSpec.model_validate({"model": {"name": "lstm4"}, "data": files, "training": {"batch_size": 8}})
    assert resolve_data(fine, built).train == built / "basic-motions" / "train.beton"


def test_a_catalog_set_smaller_than_one_global_batch_is_refused_before_it_is_built():
    with pytest.raises(ValueError, match=r"512 × 1 workers = 512 is larger than basic-motions's training set \(40\)"):
        JobSpec.model_validate({"model": {"name": "lstm4"}, "data": {"dataset": "basic-motions"}})
    JobSpec.model_validate({"model": {"name": "lstm4"}, "data": {"dataset": "basic-motions"},
                            "training": {"batch_size": 20}, "scaling": {"num_workers": 2}})  # fmt: skip
