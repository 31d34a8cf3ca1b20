"""The service's API process imports no torch: the modules it imports, and the validation it runs, need none.

What they need of the models — names, what each model takes, the attention modules' arguments — is declared once,
in `san.catalog`; the torch modules are checked against it here, so the two cannot drift apart.
"""

import inspect
import json
import subprocess
import sys

import pytest

from san import catalog

HEAVY = ("torch", "ray", "ffcv", "matplotlib")

# What the service's API process imports (service/*.py), and what it runs on every request.
API_PROCESS = """
import json, sys
import san.catalog, san.registry
import training.config, training.study, training.report, training.study_results, training.metrics
import training.mlflow_runs, training.data.resolve, training.data.catalog, training.data.manifest, training.paths
from training.config import MODELS_BUILT_ELSEWHERE, JobSpec, count_model_params, default_experiment
from training.study import StudySpec, check_cells
from training.report import FORMATS
from training.mlflow_runs import METRIC_KEYS, create_study_run, finish_study_run, metric_history
from training.study_results import table, write_results
from san.registry import list_attention, list_models, list_placements, model_inputs

token = MODELS_BUILT_ELSEWHERE.set(True)
errors = []
for spec in (
    {"model": {"name": "resnet18", "attention": "san-c", "attention_kwargs": {"use_abs": False, "kernel_size": 5}}},
    {"model": {"name": "lstm4", "attention": "ran"}, "data": {"dataset": "fashion-mnist"}},
    {"model": {"attention": "bam", "attention_kwargs": {"combine": "min"}}},
):
    try:
        JobSpec.model_validate(spec)
    except ValueError as error:
        errors.append(str(error))
study = StudySpec.model_validate({
    "base": {"model": {"name": "resnet18"}},
    "axes": {"model.attention": ["none", "san-c", "cbam"], "model.attention_kwargs.reduction": [8, 16]},
})
check_cells(study, 100)
MODELS_BUILT_ELSEWHERE.reset(token)
listed = [list_models(), list_attention(), list_placements(), [model_inputs(name) for name in list_models()]]
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
print(json.dumps({"heavy": heavy, "errors": errors, "listed": listed}))
"""


def test_the_api_process_imports_no_torch():
    script = f"HEAVY = {HEAVY!r}\n{API_PROCESS}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"imported by the API's modules: {result['heavy']}"
    assert len(result["errors"]) == 2  # lstm4 on images, and BAM's unknown combine: refused without torch
    assert "takes sequences" in result["errors"][0] and "combine" in result["errors"][1]
    models, attention, placements, inputs = result["listed"]
    assert (models, attention, placements) == (
        list(catalog.MODELS),
        list(catalog.ATTENTION_NAMES),
        list(catalog.PLACEMENTS),
    )
    assert inputs == list(catalog.MODELS.values())


# The drift checks: the torch modules against the catalog.


def test_registered_models_are_the_catalog():
    import san.models  # noqa: F401  (registers every model)
    from san import registry

    assert list(registry._MODELS) == list(catalog.MODELS)


def test_register_model_refuses_a_model_the_catalog_does_not_declare():
    from san.registry import register_model

    def unheard_of(**kwargs):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match=r"not declared in san\.catalog\.MODELS"):
        register_model(unheard_of)
    with pytest.raises(ValueError, match=r"san\.catalog\.MODELS says images"):
        register_model(inputs="sequences")(type("lenet5", (), {}))
    with pytest.raises(ValueError, match="inputs='audio'"):
        register_model(inputs="audio")


def test_attention_names_and_placements_are_the_catalog():
    from san.attention import ATTENTION_NAMES
    from san.placement import PLACEMENTS

    assert ATTENTION_NAMES == catalog.ATTENTION_NAMES
    assert PLACEMENTS == catalog.PLACEMENTS


@pytest.mark.parametrize("name", list(catalog.ATTENTION_PARAMETERS))
def test_attention_constructors_take_what_the_catalog_declares(name):
    """The catalog's parameters are the constructor's user-settable ones, in its order (error messages list them
    so), each declared a switch exactly when the constructor's annotation is ``bool``, every other one typed by an
    entry of `ATTENTION_KWARG_TYPES` that accepts the constructor's default."""
    from training.config import ATTENTION_KWARG_TYPES, ATTENTION_KWARGS, attention_parameters

    declared = catalog.ATTENTION_PARAMETERS[name]
    parameters = attention_parameters(name)  # read from the constructor's signature
    assert list(declared) == list(parameters), name
    for parameter, kind in declared.items():
        signature = parameters[parameter]
        assert (kind == catalog.BOOL) == (signature.annotation is bool), (name, parameter)
        assert kind == catalog.BOOL or kind in ATTENTION_KWARG_TYPES, (name, parameter)
        if signature.default is not inspect.Parameter.empty:
            ATTENTION_KWARGS[name].model_validate({parameter: signature.default})  # the default is a valid setting


def test_the_modules_constants_are_the_catalog():
    from san.attention.bam import COMBINES
    from san.attention.san import _ACTIVATIONS

    assert tuple(_ACTIVATIONS) == catalog.SMOOTHING_ACTIVATIONS
    assert tuple(COMBINES) == catalog.COMBINES
