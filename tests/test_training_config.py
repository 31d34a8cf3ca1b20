"""The JobSpec's checks and the schedules, without Ray."""

import pytest
from pydantic import ValidationError

from training import config
from training.config import ATTENTION_KWARGS, JobSpec
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
         "model: use_cca=False needs equal channel counts, got C'=1"),  # fashion-mnist: 1 channel
        ({"model": {"attention": "san-c", "attention_kwargs": {"kernel": 3}}}, "model.attention_kwargs.kernel",
         "attention 'san-c' takes no argument 'kernel'; it takes: kernel_size, dilation"),
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


def test_mlflow_limits_are_the_installed_mlflows():
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun
    from mlflow.utils import validation

    assert config.MLFLOW_MAX_KEY_LENGTH == validation.MAX_ENTITY_KEY_LENGTH
    assert config.MLFLOW_MAX_TAG_VALUE_LENGTH == validation.MAX_TAG_VAL_LENGTH
    assert config.MLFLOW_MAX_PARAM_VALUE_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert SqlRun.__table__.c.name.type.length == config.MLFLOW_MAX_RUN_NAME_LENGTH
    assert SqlExperiment.__table__.c.name.type.length == config.MLFLOW_MAX_EXPERIMENT_NAME_LENGTH
    for key in ("a", "san.job_id", "x/y z:1", "ü", "../a", "a//b", "/a", "a\n", "a;b", ".", "a/"):
        assert bool(config.MLFLOW_KEY_PATTERN.match(key)) == bool(validation.validate_param_and_metric_name(key))


def test_every_attention_argument_has_a_type_and_bounds():
    for name in ATTENTION_KWARGS:
        if name == "none":
            continue
        for parameter, declared in config.attention_parameters(name).items():
            assert parameter in config.ATTENTION_KWARG_TYPES or declared.annotation is bool, (name, parameter)
    assert set(ATTENTION_KWARGS["none"].model_fields) == set().union(
        *(ATTENTION_KWARGS[name].model_fields for name in ATTENTION_KWARGS if name != "none")
    )


FLOAT_FIELDS = [
    (section, name)
    for section, info in JobSpec.model_fields.items()
    for name, field in info.annotation.model_fields.items()
    if field.annotation in (float, float | None)
]


@pytest.mark.parametrize(("section", "name"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_no_float_anywhere_takes_nan_or_infinity(section, name, value):
    assert len(FLOAT_FIELDS) >= 7  # every float the spec has
    with pytest.raises(ValidationError) as caught:
        spec(**{section: {name: value}})
    assert caught.value.errors()[0]["loc"] == (section, name)
    assert caught.value.errors()[0]["type"] == "finite_number"


@pytest.mark.parametrize(
    ("model", "loc", "message"),
    [
        ({"attention": "cbam", "attention_kwargs": {"reduction": 0}}, ("reduction",), "greater than or equal to 1"),
        ({"attention": "cbam", "attention_kwargs": {"reduction": True}}, ("reduction",), "valid integer"),
        ({"attention": "cbam", "attention_kwargs": {"spatial_kernel_size": 6}}, ("spatial_kernel_size",), "odd"),
        ({"attention": "san-d", "attention_kwargs": {"kernel_size": 16}}, ("kernel_size",), "less than or equal"),
        ({"attention": "san-d", "attention_kwargs": {"dilation": 17}}, ("dilation",), "less than or equal to 16"),
        ({"attention": "san-c", "attention_kwargs": {"use_cca": "false"}}, ("use_cca",), "valid boolean"),
        ({"attention": "san-c", "attention_kwargs": {"use_cca": 0}}, ("use_cca",), "valid boolean"),
        ({"attention": "san-c", "attention_kwargs": {"smoothing_activation": "gelu"}}, ("smoothing_activation",),
         "'identity', 'relu', 'tanh' or 'sigmoid'"),
        ({"attention": "bam", "attention_kwargs": {"num_dilated": -1}}, ("num_dilated",), "greater than or equal"),
        ({"attention": "bam", "attention_kwargs": {"combine": "max"}}, ("combine",), "'sum' or 'product'"),
        ({"attention": "bam", "attention_kwargs": {"prev_channels": 3}}, ("prev_channels",),
         "attention 'bam' takes no argument 'prev_channels'; it takes: reduction, dilation, num_dilated, combine"),
        ({"attention": "none", "attention_kwargs": {"colour": 1}}, ("colour",),
         "no attention module takes an argument 'colour'"),
        ({"attention": "none", "attention_kwargs": {"reduction": 0}}, ("reduction",), "greater than or equal to 1"),
    ],
)  # fmt: skip
def test_attention_kwargs_are_typed_per_module_and_located_at_their_key(model, loc, message):
    with pytest.raises(ValidationError) as caught:
        spec(model=model)
    error = caught.value.errors()[0]
    assert error["loc"][: 2 + len(loc)] == ("model", "attention_kwargs", *loc) and message in error["msg"], error


def test_valid_kwargs_pass_unchanged_and_none_takes_any_modules_for_studies():
    kwargs = {"kernel_size": 5, "use_abs": False, "smoothing_groups": "depthwise", "smoothing_activation": "relu"}
    assert spec(model={"attention": "san-d", "attention_kwargs": kwargs}).model.attention_kwargs == kwargs
    table9 = {"use_abs": False, "use_cca": False, "use_extrema": False, "use_smoothing": False}
    assert spec(model={"attention": "none", "attention_kwargs": table9}).model.attention_kwargs == table9


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ({"tags": {"a": "x" * 8001}}, "longer than MLflow's 8000 characters"),
        ({"tags": {"a": "nul\x00"}}, "control character"),
        ({"tags": {"k" * 251: "v"}}, "1 to 250 characters"),
        ({"tags": {"a;b": "v"}}, "MLflow takes letters"),
        ({"tags": {"a/../b": "v"}}, "read as another path"),
        ({"tags": {str(n): "v" for n in range(51)}}, "at most 50 items"),
        ({"run_name": "r" * 251}, "at most 250 characters"),
        ({"run_name": "a/b"}, "no path separator"),
        ({"run_name": "a\\b"}, "no path separator"),
        ({"run_name": "..x"}, "no path separator"),
        ({"run_name": "tab\there"}, "control character"),
        ({"experiment": "e" * 257}, "at most 256 characters"),
        ({"mlflow_uri": "sqlite:///a\x00.db"}, "control character"),
        ({"system_metrics_interval_s": 0}, "greater than or equal to 0.1"),
    ],
)
def test_tracking_names_and_tags_fit_mlflow(tracking, message):
    with pytest.raises(ValidationError) as caught:
        spec(tracking=tracking)
    error = caught.value.errors()[0]
    assert error["loc"][0] == "tracking" and message in error["msg"], error


def test_a_local_spec_may_name_any_tracking_uri_and_mlflows_own_tag_values():
    tracking = {"mlflow_uri": "http://127.0.0.1:6379/", "tags": {"mlflow.note.content": "line 1\nline 2\ttab"},
                "run_name": "my run: 1", "experiment": "san/my-experiment"}  # fmt: skip
    assert spec(tracking=tracking).tracking.mlflow_uri == "http://127.0.0.1:6379/"  # `san train`: the user's machine


def test_the_model_size_is_counted_on_the_meta_device_without_allocating_it():
    import resource

    small = spec(model={"attention": "san-c"})
    assert small.model_params() == sum(p.numel() for p in small.build_model(10, 1).parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    big = spec(model={"name": "vgg19", "attention": "san-c", "placement": "full",
                      "attention_kwargs": {"kernel_size": 15}})  # fmt: skip
    assert big.model_params() > 600_000_000  # 2.7 GB of float32 if it were real
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000


# fused: CBAM's output is its registered op san::cbam (on C passes in float32 on CPU, where they build)
@pytest.mark.parametrize(
    ("path", "fused", "backward"),
    [("fused", True, "CbamOpBackward"), ("stepwise", False, "MulBackward0")],
)
def test_the_attention_path_is_set_on_every_module_and_logged(path, fused, backward):
    import torch

    from san.attention import attention_modules

    job = spec(model={"attention": "cbam", "placement": "full", "attention_path": path})
    model = job.build_model(10, 1)
    modules = attention_modules(model)
    assert len(modules) == 2 and all(m.fused is fused for m in modules.values())  # LeNet-5: both conv units
    x = torch.randn(2, 6, 28, 28, requires_grad=True)
    assert type(modules["features.0.attn"](x).grad_fn).__name__ == backward
    assert job.flat()["model.attention_path"] == path


def test_an_unknown_attention_path_is_refused():
    with pytest.raises(ValidationError, match="'fused' or 'stepwise'"):
        spec(model={"attention_path": "fast"})
