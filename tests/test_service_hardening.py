"""Issue 13 against the API in process (no job leaving the queue, no Ray): tracking URIs are the
operator's (a spec names the default or an allowed one, the API never opens another, ``/readyz`` tells an anonymous
caller no address), every value is checked where JobSpec declares it (finite numbers, attention kwargs typed per
module, MLflow's limits, a bound on the model's size), an error body is always JSON, fuzzed specs never get a 5xx
and every admitted one builds; ``san train`` answers the same rows in one line with exit 2; the API process
imports no FFCV and no Ray Train."""

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.store import JobStore
from tests.services import BIN, free_port
from training.config import ATTENTION_KWARGS, MLFLOW_MAX_PARAM_VALUE_LENGTH, JobSpec
from training.data.catalog import CATALOG
from training.states import JobStatus

pytestmark = pytest.mark.timeout(300, method="thread")

SPEC = {"model": {"name": "lenet5", "attention": "san-c"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"peak_epoch": 1}}  # fmt: skip
ALLOWED = "http://mlflow.allowed.example:5000"  # named in SAN_MLFLOW_ALLOWED_URIS; never contacted (jobs stay queued)
MAX_PARAMS = 30_000_000  # resnet18/50 fit, every VGG does not


def closed_port() -> int:
    return free_port()  # nothing listens there


@pytest.fixture(scope="module")
def service(in_process):
    default = f"http://127.0.0.1:{closed_port()}"  # the service's own MLflow: down, so /readyz has an error to tell
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        patch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
        service = in_process(
            max_submitted=0,
            ray_address=f"http://127.0.0.1:{free_port()}",
            mlflow_uri=default,
            mlflow_allowed_uris=[ALLOWED],
            max_model_params=MAX_PARAMS,
        )
        service.default_uri = default
        yield service


def post_raw(client: httpx.Client, path: str, body) -> httpx.Response:
    """``body`` as Python's JSON writes it: NaN and Infinity included (httpx's ``json=`` refuses them)."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


ROWS = [  # the issue's table: every row a 422 naming its field
    ({"tracking": {"mlflow_uri": "http://127.0.0.1:6379/"}}, ["body", "tracking", "mlflow_uri"], "not an MLflow URI"),
    ({"tracking": {"mlflow_uri": "sqlite:////etc/anything.db"}}, ["body", "tracking", "mlflow_uri"],
     "not an MLflow URI"),
    ({"tracking": {"mlflow_uri": "file:///root"}}, ["body", "tracking", "mlflow_uri"], "not an MLflow URI"),
    ({"model": {"attention": "cbam", "attention_kwargs": {"reduction": 0}}},
     ["body", "model", "attention_kwargs", "reduction"], "greater than or equal to 1"),
    ({"lr": {"lr": float("nan")}}, ["body", "lr", "lr"], "finite number"),
    ({"lr": {"lr": float("inf")}}, ["body", "lr", "lr"], "finite number"),
    ({"model": {"attention": "san-c", "attention_kwargs": {"kernel_size": 0}}},
     ["body", "model", "attention_kwargs", "kernel_size"], "greater than or equal to 1"),
    ({"model": {"attention": "san-c", "attention_kwargs": {"kernel_size": 100001}}},
     ["body", "model", "attention_kwargs", "kernel_size"], "less than or equal to 15"),
    ({"model": {"attention": "san-c", "attention_kwargs": {"use_abs": "maybe"}}},
     ["body", "model", "attention_kwargs", "use_abs"], "valid boolean"),
    ({"model": {"attention": "bam", "attention_kwargs": {"dilation": -1}}},
     ["body", "model", "attention_kwargs", "dilation"], "greater than or equal to 1"),
    ({"model": {"attention": "cbam", "attention_kwargs": {"use_cca": False}}},
     ["body", "model", "attention_kwargs", "use_cca"], "attention 'cbam' takes no argument 'use_cca'"),
    ({"model": {"attention": "cbam", "attention_kwargs": {"spatial_kernel_size": 4}}},
     ["body", "model", "attention_kwargs", "spatial_kernel_size"], "must be odd"),
    ({"tracking": {"tags": {"note": "x" * 60_000}}}, ["body", "tracking", "tags"], "longer than MLflow's 8000"),
    ({"tracking": {"run_name": "../up\x00"}}, ["body", "tracking", "run_name"], "control character"),
    ({"tracking": {"run_name": "../up"}}, ["body", "tracking", "run_name"], "no path separator"),
    ({"training": {"epochs": 2, "batch_size": 32, "seed": -1}}, ["body", "training", "seed"], "greater than or equal"),
    ({"model": {"name": "resnet18", "attention": "san-c", "placement": "full",
                "attention_kwargs": {"kernel_size": 15}}}, ["body", "model"],
     f"is above this service's limit of {MAX_PARAMS:,}"),
    ({"model": {"name": "vgg16"}}, ["body", "model"], "parameters is above this service's limit"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "loc", "text"), ROWS)
def test_each_row_of_the_issue_is_a_422_naming_its_field(service, change, loc, text):
    with service.client() as alice:
        before = alice.get("/v1/jobs").json()["total"]
        response = post_raw(alice, "/v1/jobs", {**SPEC, **change})
        assert response.status_code == 422, response.text
        error = response.json()["detail"][0]
        assert error["loc"] == loc and text in error["msg"], error
        assert alice.get("/v1/jobs").json()["total"] == before  # nothing stored


def test_an_error_body_is_json_even_for_inputs_json_cannot_write(service):
    with service.client() as alice:
        for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
            body = '{"lr": {"lr": %s}, "optimizer": {"weight_decay": %s}}' % (literal, literal)  # noqa: UP031
            response = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (literal, response.text)
            errors = response.json()["detail"]
            assert {tuple(e["loc"]) for e in errors} == {("body", "lr", "lr"), ("body", "optimizer", "weight_decay")}
            assert {e["input"] for e in errors} <= {"nan", "inf", "-inf"}  # named, not dropped silently
        long_tag = alice.post("/v1/jobs", json={**SPEC, "tracking": {"tags": {"a": "y" * 60_000}}})
        assert long_tag.status_code == 422 and len(long_tag.content) < 2000  # the input is not echoed whole


def test_a_spec_may_name_the_default_or_an_allowed_uri_in_any_spelling_and_gets_the_configured_one(service):
    with service.client() as alice:
        for named, expected in ((None, service.default_uri), (ALLOWED + "/", ALLOWED),
                                (service.default_uri + "/", service.default_uri)):  # fmt: skip
            tracking = {"mlflow_uri": named} if named else {}
            response = alice.post("/v1/jobs", json={**SPEC, "tracking": tracking})
            assert response.status_code == 201, response.text
            assert response.json()["spec"]["tracking"]["mlflow_uri"] == expected


def test_a_study_naming_another_uri_is_refused_before_anything(service):
    study = {"name": "s", "base": {**SPEC, "tracking": {"mlflow_uri": "http://127.0.0.1:6379/"}},
             "axes": {"model.attention": ["none", "san-c"]}}  # fmt: skip
    with service.client() as alice:
        before = alice.get("/v1/studies").json()["total"]
        response = alice.post("/v1/studies", json=study)
        assert response.status_code == 422, response.text
        error = response.json()["detail"][0]
        assert error["loc"] == ["body", "base", "tracking", "mlflow_uri"] and "not an MLflow URI" in error["msg"]
        assert alice.get("/v1/studies").json()["total"] == before


def test_readyz_tells_an_anonymous_caller_only_ok_or_error(service):
    host_port = service.default_uri.removeprefix("http://")
    with service.client(None) as anonymous:
        response = anonymous.get("/readyz")
    assert response.status_code == 503  # neither Ray nor MLflow is there
    body = response.text
    assert service.default_uri not in body and host_port not in body and ALLOWED not in body
    assert response.json() == {
        "ready": False,
        "checks": {
            "database": {"status": "ok"},
            "ray": {"status": "error"},
            "mlflow": {"status": "error"},
            "admission": {"status": "ok"},
        },
    }
    with service.client("alice") as alice:  # a known token gets the details
        checks = alice.get("/readyz").json()["checks"]
    assert checks["mlflow"]["status"] == "error" and checks["mlflow"]["detail"]
    assert checks["ray"]["detail"]


def test_a_stored_job_naming_an_unconfigured_uri_is_never_opened(service):
    """A row from before the allow-list (or edited by hand) names a server this test listens on: its view and
    metrics answer without a single connection to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        foreign = f"http://127.0.0.1:{listener.getsockname()[1]}"
        spec = JobSpec.model_validate({**SPEC, "tracking": {"mlflow_uri": foreign}}).model_dump(mode="json")
        store = JobStore(f"sqlite:///{service.root / 'runs' / 'service.db'}")
        try:
            job, _ = store.create("alice", spec)
            assert store.transition(job.id, JobStatus.CANCELLED, mlflow_run_id="0" * 32)  # as if it had reported
        finally:
            store.close()
        with service.client() as alice:
            shown = alice.get(f"/v1/jobs/{job.id}")
            assert shown.status_code == 200 and shown.json()["metrics"] == {} and shown.json()["progress"] is None
            metrics = alice.get(f"/v1/jobs/{job.id}/metrics")
            assert metrics.status_code == 503 and "not an MLflow URI this service reads" in metrics.json()["detail"]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked


# Fuzzing: mostly valid specs with random mutations, POSTed as JSON (NaN and Infinity included).
SECTIONS = {name: info.annotation for name, info in JobSpec.model_fields.items()}
PATHS = sorted(f"{section}.{field}" for section, model in SECTIONS.items() for field in model.model_fields)
PATHS += ["model.colour", "nosection.x", "tracking.tags.note", "model.attention_kwargs.kernel_size"]
KWARG_NAMES = [*sorted(ATTENTION_KWARGS["none"].model_fields), "bogus", "channels", "prev_channels"]

nasty = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1.0, 0.0, 0.5]),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 15, 16, 17, 100_001, 2**32, 2**63]),
    st.booleans(),
    st.none(),
    st.text(max_size=20),  # control characters and NUL included
    st.text(alphabet="ab/.", min_size=5000, max_size=9000),
    st.sampled_from(["maybe", "depthwise", "sum", "../x", "a/b", "\x00", "..", "lenet5", "cbam", "small", "bf16"]),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3),
)
ODD_KWARG_VALUES = [100_001, "maybe", "depthwise", "sum", "product", "relu", "gelu", 2.5, None, float("nan")]
kwarg_values = st.one_of(st.booleans(), st.integers(-3, 40), st.sampled_from(ODD_KWARG_VALUES))
MODEL_NAMES = ["lenet5"] * 6 + ["lstm4"] * 3 + ["resnet18", "resnet50", "vgg16", "vgg19_bn", "lenet9"]
models = st.fixed_dictionaries(
    {
        "name": st.sampled_from(MODEL_NAMES),
        "attention": st.sampled_from(["none", "san-c", "san-d", "cbam", "bam", "ran"] * 3 + ["sanc"]),
        "placement": st.sampled_from(["bottleneck", "full"] * 4 + ["middle"]),
        "attention_kwargs": st.dictionaries(st.sampled_from(KWARG_NAMES), kwarg_values, max_size=3),
    },
    optional={"stem": st.sampled_from(["small", "small", None, "imagenet", "x"]), "blurpool": st.booleans(),
              "attention_path": st.sampled_from(["fused", "stepwise", "fast"])},
)  # fmt: skip
VALID_KWARG_VALUES = {  # inside the bounds (a group count that does not divide the channels still fails)
    "kernel_size": st.integers(1, 15), "spatial_kernel_size": st.sampled_from([1, 3, 5, 7, 15]),
    "dilation": st.integers(1, 16), "reduction": st.integers(1, 64), "num_dilated": st.integers(0, 8),
    "smoothing_groups": st.sampled_from([1, 2, 3, "depthwise"]), "combine": st.sampled_from(["sum", "product"]),
    "smoothing_activation": st.sampled_from(["identity", "relu", "tanh", "sigmoid"]),
}  # fmt: skip
tags = st.dictionaries(st.text(max_size=12), st.text(max_size=30) | st.text(alphabet="t", min_size=7990, max_size=8010),
                       max_size=3)  # fmt: skip


SERIES_SETS = [name for name, info in CATALOG.items() if info.kind == "series"]


def set_path(body: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    target = body
    for part in parents:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[last] = value


@st.composite
def job_specs(draw) -> dict:
    body = json.loads(json.dumps(SPEC))
    body["model"] = model = draw(models)
    takes = ATTENTION_KWARGS[model["attention"]].model_fields if model["attention"] in ATTENTION_KWARGS else {}
    if takes and draw(st.booleans()):  # kwargs this attention takes, mostly valid
        names = draw(st.lists(st.sampled_from(sorted(ATTENTION_KWARGS[model["attention"]].model_fields)), max_size=3))
        model["attention_kwargs"] = {name: draw(VALID_KWARG_VALUES.get(name, st.booleans())) for name in names}
    if draw(st.booleans()):
        body["tracking"] = {"tags": draw(tags)}
    if model["name"] == "lstm4" or draw(st.integers(0, 9)) == 0:  # mostly a time series for the recurrent model
        body["data"] = {"dataset": draw(st.sampled_from([*SERIES_SETS, "fashion-mnist"]))}
        body["training"]["batch_size"] = draw(st.integers(1, 48))
    for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), nasty), max_size=2)):
        set_path(body, path, value)
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=job_specs())
def test_fuzzed_specs_never_get_a_5xx_and_every_admitted_model_builds_within_the_bound(service, body):
    with service.client("bob") as bob:
        response = post_raw(bob, "/v1/jobs", body)
    assert response.status_code in (201, 413, 422), response.text
    event(f"status {response.status_code}")
    answer = response.json()  # always JSON
    if response.status_code != 201:
        assert answer["detail"] if response.status_code == 413 else answer["detail"][0]["msg"]
        return
    spec = JobSpec.model_validate(answer["spec"])  # what the job will load
    assert spec.tracking.mlflow_uri in (service.default_uri, ALLOWED)
    assert all(len(value) <= MLFLOW_MAX_PARAM_VALUE_LENGTH for value in spec.flat().values())
    num_classes, in_chans = spec.data.shape()
    with torch.device("meta"):
        model = spec.build_model(num_classes, in_chans)
    assert sum(p.numel() for p in model.parameters()) <= MAX_PARAMS
    if spec.model.name == "lenet5":  # small: the real thing, on the CPU, forward at the data's 28 px
        model = spec.build_model(num_classes, in_chans).eval()
        with torch.no_grad():
            out = model(torch.randn(2, in_chans, 28, 28))
        assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    if spec.model.name == "lstm4" and not (spec.data.train_path or spec.data.val_path):  # the set's length, features
        info = CATALOG[spec.data.dataset]
        assert info.kind == "series"
        model = spec.build_model(num_classes, in_chans).eval()
        with torch.no_grad():
            out = model(torch.randn(2, info.resolution, in_chans))
        assert out.shape == (2, num_classes) and torch.isfinite(out).all()


def test_the_api_process_imports_no_ffcv_no_ray_train_and_no_torch(tmp_path):
    code = textwrap.dedent("""
        import json, sys
        from san.cli import build_parser
        from service.app import create_app
        from service.settings import ServiceSettings
        build_parser()  # every `san` subcommand registered, as `san serve` does
        create_app(ServiceSettings(ray_address="http://127.0.0.1:9"))
        print(json.dumps(sorted(sys.modules)))
    """)
    env = {"PATH": str(BIN), "HOME": str(tmp_path), "SAN_STORAGE_ROOT": str(tmp_path / "runs")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=Path(__file__).parent.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout.splitlines()[-1]))
    assert {"service.routes.studies", "service.studies", "training.study", "training.data.resolve"} <= modules
    assert not {m for m in modules if m == "ffcv" or m.startswith("ffcv.")}
    assert not {m for m in modules if m == "ray.train" or m.startswith("ray.train.")}
    assert "training.launch" not in modules and "training.loop" not in modules
    assert not {m for m in modules if m.split(".")[0] in ("torch", "matplotlib")}  # issue 25: models built elsewhere
