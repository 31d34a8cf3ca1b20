"""The admission worker (issue 24): checks that build models run in another process, bounded in time — past the
bound the worker is killed and a fresh one answers the next check —, their errors cross with their fields, and the
parameter counts jobs need are kept, refusals included, so the API process never builds a model."""

import os
import time

import pytest

from service.admission import CheckTimeout, ModelChecks, ModelRefused, ModelSizes, WorkerLost
from training.config import MODELS_BUILT_ELSEWHERE, JobSpec
from training.study import StudyError, StudySpec, expand

pytestmark = pytest.mark.timeout(300, method="thread")


def refuse(loc: tuple[str, ...], message: str) -> None:
    raise StudyError(loc, message)


@pytest.fixture(scope="module")
def checks():
    checks = ModelChecks(timeout_s=20)
    checks.start()
    yield checks
    checks.close()


def test_a_check_runs_in_another_process_and_its_error_crosses_with_its_fields(checks):
    assert checks.run(os.getpid) != os.getpid()
    with pytest.raises(StudyError) as error:
        checks.run(refuse, ("axes", "model.attention"), "no such module")
    assert (error.value.loc, error.value.message) == (("axes", "model.attention"), "no such module")
    expansion = checks.run(expand, StudySpec.model_validate({"axes": {"model.attention": ["none", "san-c"]}}))
    assert [cell.key for cell in expansion.cells] == ["c000", "c001"] and len(expansion.children) == 2


def test_a_check_past_its_bound_kills_the_worker_and_the_next_check_gets_a_fresh_one(checks):
    first = checks.run(os.getpid)
    checks.timeout_s = 0.5
    try:
        started = time.monotonic()
        with pytest.raises(CheckTimeout, match=r"longer than this service.s bound of 0\.5 s"):
            checks.run(time.sleep, 30)
        assert time.monotonic() - started < 5
    finally:
        checks.timeout_s = 20
    second = checks.run(os.getpid)
    assert second != first
    os.kill(second, 9)  # killed from outside (the OOM killer, say): that check fails, the next is answered
    time.sleep(0.2)
    assert checks.run(os.getpid) not in (first, second)
    assert checks.ping() == "ready"


def test_model_sizes_are_counted_once_in_the_worker_refusals_included(checks):
    sizes = ModelSizes(checks)
    asked = []
    run = checks.run
    checks.run = lambda check, *args: asked.append(args) or run(check, *args)
    try:
        spec = JobSpec.model_validate({"model": {"attention": "san-c"}})
        params = sizes.params(spec.model_key())
        assert params == spec.model_params() and sizes.params(spec.model_key()) == params
        token = MODELS_BUILT_ELSEWHERE.set(True)  # as in the API: validation leaves the build to the worker
        try:
            bad = JobSpec.model_validate({"model": {"attention": "san-c", "attention_kwargs": {"smoothing_groups": 4}}})
        finally:
            MODELS_BUILT_ELSEWHERE.reset(token)
        for _ in range(2):
            with pytest.raises(ModelRefused, match=r"^model: "):
                sizes.params(bad.model_key())
        assert len(asked) == 2  # one count per model, each kept
    finally:
        checks.run = run


def test_a_worker_that_cannot_start_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr("service.admission.STARTUP_S", 0.01)
    checks = ModelChecks(timeout_s=5)
    try:
        with pytest.raises(WorkerLost, match="did not start"):
            checks.run(os.getpid)
    finally:
        checks.close()
