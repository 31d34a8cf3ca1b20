"""The JobSpec's checks and the schedules, without Ray."""

import pytest
from pydantic import ValidationError

from training.config import JobSpec
from training.schedule import learning_rate, resolution_at


def spec(**sections) -> JobSpec:
    return JobSpec.model_validate(sections)


@pytest.mark.parametrize(
    ("sections", "field", "message"),
    [
        ({"model": {"name": "resnet34"}}, "model.name", "unknown model 'resnet34'; choose one of: lenet5"),
        ({"model": {"attention": "sanc"}}, "model.attention", "unknown attention 'sanc'"),
        ({"training": {"epochs": 0}}, "training.epochs", "greater than or equal to 1"),
        ({"training": {"amp": "bf16"}}, "", "training.amp='bf16' needs scaling.use_gpu=true"),
        ({"model": {"name": "resnet18", "attention": "san-c", "attention_kwargs": {"use_cca": False}}}, "",
         "model: use_cca=False needs equal channel counts, got C'=3"),
        ({"model": {"attention": "san-c", "attention_kwargs": {"kernel": 3}}}, "", "model: "),
        ({"lr": {"peak_epoch": 20}, "training": {"epochs": 4}}, "", "lr.peak_epoch 20.0 is after the last epoch"),
        ({"resolution": {"min_res": 160}}, "resolution", "min_res and resolution.max_res are set together"),
        ({"trainig": {"epochs": 3}}, "trainig", "Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_bad_specs_fail_naming_the_field(sections, field, message):
    with pytest.raises(ValidationError) as caught:
        spec(**sections)
    error = caught.value.errors()[0]
    assert ".".join(str(p) for p in error["loc"]) == field
    assert message in error["msg"]


def test_flat_params_name_every_field_once():
    flat = spec(model={"attention": "san-d", "attention_kwargs": {"use_abs": False}}).flat()
    assert flat["model.name"] == "lenet5" and flat["model.attention"] == "san-d"
    assert flat["model.attention_kwargs"] == '{"use_abs": false}'
    assert flat["training.epochs"] == "16" and flat["scaling.num_workers"] == "1"
    assert spec().run_name == "lenet5-none-bottleneck-s0" and spec().experiment == "san/fashion-mnist"


def test_cyclic_schedule_peaks_at_the_peak_epoch_and_ends_at_zero():
    job = spec(lr={"lr": 0.5, "schedule": "cyclic", "peak_epoch": 2}, training={"epochs": 8, "batch_size": 256})
    lrs = [learning_rate(job, e / 10, world_size=2) for e in range(81)]
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 20  # 0.5 × 512 / 256 at epoch 2
    assert lrs[-1] == 0.0 and lrs[0] == pytest.approx(1e-4)


def test_step_and_cosine_schedules():
    step = spec(lr={"lr": 0.1, "schedule": "step", "step_epochs": 3, "step_ratio": 0.1}, training={"batch_size": 256})
    assert [round(learning_rate(step, e, 1), 6) for e in (0, 2.9, 3, 6)] == [0.1, 0.1, 0.01, 0.001]
    cosine = spec(lr={"lr": 0.1, "schedule": "cosine"}, training={"epochs": 10, "batch_size": 256})
    assert learning_rate(cosine, 5, 1) == pytest.approx(0.05) and learning_rate(cosine, 10, 1) == pytest.approx(0)


def test_progressive_resizing_ramps_in_steps_of_32():
    job = spec(resolution={"min_res": 160, "max_res": 192, "start_ramp": 2, "end_ramp": 4})
    assert [resolution_at(job, e, 224) for e in range(6)] == [160, 160, 160, 192, 192, 192]  # 176 rounds to 192
    wide = spec(resolution={"min_res": 96, "max_res": 224, "start_ramp": 1, "end_ramp": 5})
    assert [resolution_at(wide, e, 224) for e in range(7)] == [96, 96, 128, 160, 192, 224, 224]
    assert resolution_at(spec(), 3, 28) == 28
