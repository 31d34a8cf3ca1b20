"""Every preset in configs/ is a valid JobSpec."""

from pathlib import Path

import pytest

from training.config import JobSpec

PRESETS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_four_presets_exist():
    assert [p.stem for p in PRESETS] == ["lenet5-fmnist", "resnet18-imagenet-16ep", "resnet50-imagenet-24ep",
                                         "vgg16-imagenet"]  # fmt: skip


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_a_valid_spec(path):
    spec = JobSpec.load(path)
    assert path.stem.startswith(spec.model.name.removesuffix("_bn"))
