"""Each writer on files in its real distribution format: counts, labels, class maps and pixels read back equal."""

import json

import numpy as np
import pytest

from tests.formats import random_rgb, write_cifar10, write_cifar100, write_gtsrb, write_idx, write_imagenet
from tests.readback import read_labels, read_pixels
from training.data.build import build_dataset
from training.data.catalog import dataset_info
from training.data.manifest import load_manifest
from training.data.writer import WriterOptions

pytestmark = pytest.mark.timeout(300, method="thread")
OPTIONS = WriterOptions(num_workers=1)


def test_idx_writer_reads_magic_numbers_and_big_endian_dimensions(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30)
    val = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12)
    write_idx(tmp_path / "src", "train", *train)
    write_idx(tmp_path / "src", "t10k", *val, gz=False)
    manifests = build_dataset("idx", tmp_path / "src", tmp_path / "out", OPTIONS)
    assert manifests["train"].count == 30 and manifests["val"].count == 12
    assert manifests["train"].channels == 1 and manifests["train"].resolution == (28, 28)
    for split, (images, labels) in (("train", train), ("val", val)):
        beton = tmp_path / "out" / f"{split}.beton"
        assert np.array_equal(read_labels(beton), labels)
        pixels = read_pixels(beton)
        assert np.array_equal(pixels, np.repeat(images[..., None], 3, axis=3))
    assert manifests["train"].mean[0] == pytest.approx(train[0].mean())
    assert manifests["train"].std[0] == pytest.approx(train[0].std())


def test_idx_writer_rejects_a_wrong_magic_number_and_leaves_no_file(tmp_path):
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "src", "train", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4))
    write_idx(tmp_path / "src", "t10k", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4))
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz"):
        build_dataset("idx", tmp_path / "src", tmp_path / "out", OPTIONS)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def cifar_images(rng, n):
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_cifar10_writer_reads_planar_pickles_in_batch_order(tmp_path):
    rng = np.random.default_rng(2)
    batches = [(cifar_images(rng, 3), rng.integers(0, 10, 3)) for _ in range(5)]
    test = cifar_images(rng, 4), rng.integers(0, 10, 4)
    write_cifar10(tmp_path / "cifar-10-batches-py", batches, test)
    manifests = build_dataset("cifar10", tmp_path / "cifar-10-batches-py", tmp_path / "out", OPTIONS)
    assert manifests["train"].count == 15 and manifests["val"].count == 4
    assert list(manifests["train"].classes)[:3] == ["airplane", "automobile", "bird"]
    train_images = np.concatenate([b[0] for b in batches])
    assert np.array_equal(read_pixels(tmp_path / "out" / "train.beton"), train_images)
    assert np.array_equal(read_labels(tmp_path / "out" / "train.beton"), np.concatenate([b[1] for b in batches]))
    assert np.array_equal(read_pixels(tmp_path / "out" / "val.beton"), test[0])


@pytest.mark.parametrize(("variant", "num_classes", "label_index"), [("cifar100", 100, 1), ("cifar20", 20, 2)])
def test_cifar100_writer_uses_fine_or_coarse_labels(tmp_path, variant, num_classes, label_index):
    rng = np.random.default_rng(3)
    train = cifar_images(rng, 6), rng.integers(0, 100, 6), rng.integers(0, 20, 6)
    test = cifar_images(rng, 2), rng.integers(0, 100, 2), rng.integers(0, 20, 2)
    write_cifar100(tmp_path / "cifar-100-python", train, test)
    manifests = build_dataset(variant, tmp_path / "cifar-100-python", tmp_path / "out", OPTIONS)
    assert manifests["train"].num_classes == num_classes
    assert np.array_equal(read_labels(tmp_path / "out" / "train.beton"), train[label_index])
    assert np.array_equal(read_labels(tmp_path / "out" / "val.beton"), test[label_index])
    assert np.array_equal(read_pixels(tmp_path / "out" / "val.beton"), test[0])


def test_gtsrb_writer_reads_ppm_files_and_semicolon_csvs(tmp_path):
    rng = np.random.default_rng(4)
    train = {label: [random_rgb(rng, 30, 30) for _ in range(3)] for label in (0, 1, 42)}
    test = [(random_rgb(rng, 30, 30), label) for label in (42, 0, 1, 1)]
    write_gtsrb(tmp_path / "GTSRB", train, test)
    manifests = build_dataset("gtsrb", tmp_path / "GTSRB", tmp_path / "out", OPTIONS)
    assert manifests["train"].count == 9 and manifests["val"].count == 4 and manifests["train"].num_classes == 43
    assert read_labels(tmp_path / "out" / "train.beton").tolist() == [0, 0, 0, 1, 1, 1, 42, 42, 42]
    assert read_labels(tmp_path / "out" / "val.beton").tolist() == [42, 0, 1, 1]
    expected = np.stack([image for label in (0, 1, 42) for image in train[label]])
    assert np.array_equal(read_pixels(tmp_path / "out" / "train.beton"), expected)
    cropped = build_dataset("gtsrb", tmp_path / "GTSRB", tmp_path / "roi", OPTIONS, roi_crop=True)
    assert cropped["val"].resolution == (28, 28)  # the ROI leaves a 1-px border
    assert np.array_equal(read_pixels(tmp_path / "roi" / "val.beton")[0], test[0][0][1:29, 1:29])


@pytest.mark.parametrize("flat_val", [True, False])
def test_imagenet_writer_handles_cmyk_grey_and_png_named_jpeg(tmp_path, flat_val):
    counts = write_imagenet(tmp_path / "imagenet", np.random.default_rng(5), flat_val)
    manifests = build_dataset("imagenet", tmp_path / "imagenet", tmp_path / "out", OPTIONS)
    wnids = {"n01440764": 0, "n01443537": 1, "n01484850": 2}
    assert manifests["train"].classes == wnids and manifests["val"].classes == wnids
    assert manifests["train"].count == counts["train"] == 15 and manifests["val"].count == counts["val"] == 6
    assert read_labels(tmp_path / "out" / "train.beton").tolist() == [0] * 4 + [1] * 7 + [2] * 4
    assert sorted(read_labels(tmp_path / "out" / "val.beton").tolist()) == [0, 0, 1, 1, 2, 2]
    assert manifests["train"].resolution[0] <= 120 and manifests["train"].skipped == {}


def test_imagenet_writer_keeps_raw_pixels_and_the_manifest_beside_the_file(tmp_path):
    rng = np.random.default_rng(6)
    images = {}
    for wnid in ("n1", "n2"):
        for split in ("train", "val"):
            folder = tmp_path / "src" / split / wnid
            folder.mkdir(parents=True)
            image = random_rgb(rng, 20, 24)
            from PIL import Image

            Image.fromarray(image).save(folder / "a.png")
            images[(split, wnid)] = image
    build_dataset("imagenet", tmp_path / "src", tmp_path / "out", WriterOptions(num_workers=1, write_mode="raw"))
    pixels = read_pixels(tmp_path / "out" / "train.beton")
    assert np.array_equal(pixels, np.stack([images[("train", "n1")], images[("train", "n2")]]))
    manifest = json.loads((tmp_path / "out" / "train.json").read_text())
    assert manifest["format"] == "imagenet" and manifest["count"] == 2 and manifest["options"]["write_mode"] == "raw"
    assert load_manifest(tmp_path / "out" / "train.beton").classes == {"n1": 0, "n2": 1}


def test_subset_keeps_images_spread_over_every_class(tmp_path):
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(10), 10)
    write_idx(tmp_path / "src", "train", rng.integers(0, 256, (100, 28, 28), dtype=np.uint8), labels)
    write_idx(tmp_path / "src", "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10))
    build_dataset("idx", tmp_path / "src", tmp_path / "out", WriterOptions(num_workers=1, subset=20))
    assert sorted(set(read_labels(tmp_path / "out" / "train.beton").tolist())) == list(range(10))
    assert load_manifest(tmp_path / "out" / "train.beton").count == 20


@pytest.mark.slow
def test_embedded_fashion_mnist_is_the_real_60k_10k_set(tmp_path):
    manifests = build_dataset("fashion-mnist", None, tmp_path, WriterOptions(num_workers=2))
    assert manifests["train"].count == 60_000 and manifests["val"].count == 10_000
    assert list(manifests["train"].classes)[:2] == ["T-shirt/top", "Trouser"]
    assert np.bincount(read_labels(tmp_path / "train.beton")).tolist() == [6_000] * 10
    assert np.bincount(read_labels(tmp_path / "val.beton")).tolist() == [1_000] * 10
    assert manifests["train"].mean[0] == pytest.approx(72.94, abs=0.01)
    published = dataset_info("fashion-mnist")  # the catalog's published normalisation agrees with the measured
    assert manifests["train"].mean == pytest.approx(published.mean, abs=0.05)
    assert manifests["train"].std == pytest.approx(published.std, abs=0.05)
