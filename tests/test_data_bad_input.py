"""Bad input gets an error naming the file or the problem, and leaves no output file behind."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.formats import random_rgb, write_imagenet
from tests.readback import read_labels
from training.data.build import build_dataset
from training.data.manifest import load_manifest
from training.data.writer import WriterOptions

pytestmark = pytest.mark.timeout(300, method="thread")
OPTIONS = WriterOptions(num_workers=1)
SAN = str(Path(sys.executable).with_name("san"))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


def test_missing_source_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("imagenet", tmp_path / "nowhere", tmp_path / "out", OPTIONS)
    assert leftovers(tmp_path / "out") == []


def test_empty_source_is_refused(tmp_path):
    (tmp_path / "src" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        build_dataset("imagenet", tmp_path / "src", tmp_path / "out", OPTIONS)
    assert leftovers(tmp_path / "out") == []


def test_class_folder_without_images_is_named(tmp_path):
    write_imagenet(tmp_path / "src", np.random.default_rng(0), flat_val=False)
    (tmp_path / "src" / "train" / "n09999999").mkdir()
    (tmp_path / "src" / "train" / "n09999999" / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match="n09999999: class folder with no images"):
        build_dataset("imagenet", tmp_path / "src", tmp_path / "out", OPTIONS)
    assert leftovers(tmp_path / "out") == []


def test_val_classes_missing_from_train_are_named_and_train_is_not_written(tmp_path):
    write_imagenet(tmp_path / "src", np.random.default_rng(1), flat_val=False)
    stray = tmp_path / "src" / "val" / "n07777777"
    stray.mkdir()
    Image.fromarray(random_rgb(np.random.default_rng(2), 30, 30)).save(stray / "x.JPEG")
    with pytest.raises(ValueError, match="classes not in the train split: n07777777"):
        build_dataset("imagenet", tmp_path / "src", tmp_path / "out", OPTIONS)
    assert leftovers(tmp_path / "out") == []


def test_non_image_and_corrupt_files_are_skipped_counted_and_listed(tmp_path):
    write_imagenet(tmp_path / "src", np.random.default_rng(3), flat_val=False)
    folder = tmp_path / "src" / "train" / "n01440764"
    (folder / "README.txt").write_text("not an image")
    whole = (folder / "n01440764_0.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (folder / "garbage.JPEG").write_bytes(b"\xff\xd8 this is not a jpeg")
    manifests = build_dataset("imagenet", tmp_path / "src", tmp_path / "out", OPTIONS)
    skipped = manifests["train"].skipped
    assert [Path(p).name for p in skipped["not an image"]] == ["README.txt"]
    assert sorted(Path(p).name for p in skipped["unreadable"]) == ["garbage.JPEG", "truncated.JPEG"]
    assert manifests["train"].count == len(read_labels(tmp_path / "out" / "train.beton")) == 15
    assert load_manifest(tmp_path / "out" / "train.beton").skipped == skipped


def test_strict_refuses_corrupt_images_naming_them(tmp_path):
    write_imagenet(tmp_path / "src", np.random.default_rng(4), flat_val=False)
    (tmp_path / "src" / "train" / "n01440764" / "bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match=r"1 unreadable image\(s\): .*bad\.JPEG"):
        build_dataset("imagenet", tmp_path / "src", tmp_path / "out", OPTIONS, strict=True)
    assert leftovers(tmp_path / "out") == []


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    result = subprocess.run(
        [SAN, "data", "build", "cifar10", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "missing: no such directory" in result.stderr and leftovers(tmp_path / "out") == []
    result = subprocess.run(
        [SAN, "data", "info", str(tmp_path / "x.beton")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "no manifest" in result.stderr


def test_cli_builds_and_inspects_a_dataset(tmp_path):
    write_imagenet(tmp_path / "src", np.random.default_rng(5))
    build = subprocess.run(
        [SAN, "data", "build", "imagenet", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--num-workers", "1",
         "--write-mode", "jpg", "--jpeg-quality", "80"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert "train.beton: 15 images, 3 classes" in build.stdout and "val.beton: 6 images, 3 classes" in build.stdout
    info = subprocess.run([SAN, "data", "info", str(tmp_path / "out" / "train.beton")], capture_output=True, text=True)
    assert info.returncode == 0 and "read back: 15 records (matches the manifest)" in info.stdout
    assert '"jpeg_quality": 80' in info.stdout
    bad = subprocess.run(
        [SAN, "data", "build", "imagenet", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--jpeg-quality", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--jpeg-quality" in bad.stderr and leftovers(tmp_path / "o2") == []
