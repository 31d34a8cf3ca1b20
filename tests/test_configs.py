"""Every preset in configs/ is a valid JobSpec."""

from pathlib import Path

import pytest

from training.config import JobSpec
from training.study import StudySpec, expand

PRESETS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_four_presets_exist():
    assert [p.stem for p in PRESETS] == ["lenet5-fmnist", "resnet18-imagenet-16ep", "resnet50-imagenet-24ep",
                                         "vgg16-imagenet"]  # fmt: skip


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_a_valid_spec(path):
    spec = JobSpec.load(path)
    assert path.stem.startswith(spec.model.name.removesuffix("_bn"))


STUDIES = sorted((Path(__file__).parent.parent / "configs" / "studies").glob("*.yaml"))


def test_the_study_presets_exist():
    assert [p.stem for p in STUDIES] == ["table1-resnet18-imagenet", "table2-vgg16-cifar10", "table3-resnet18-cifar10",
                                         "table4-fmnist", "table6-motion", "table7-forecast",
                                         "table9-fmnist"]  # fmt: skip


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_preset_expands_and_knows_the_papers_figure_of_every_cell_that_runs(path):
    study = StudySpec.load(path)
    expansion = expand(study)
    assert expansion.children and study.paper is not None
    for cell in expansion.cells:
        # the table's metrics the paper prints in every row (Table IX gives no top-5)
        printed = [m for m in study.table_metrics if m != "top5"]
        assert cell.refused or all(cell.paper.get(m) is not None for m in printed), (cell.key, cell.labels)
