"""`StopWatch`'s pacing and landing, on one process with a clock the test drives: the end-to-end tests
(test_training_ray.py, test_training_cancel.py) show a stop lands mid-epoch on a real cluster; these show *where*
it lands and how often the ranks would meet, exactly."""

import itertools

import pytest

from training import stop as stop_module
from training.stop import CHECK_INTERVAL_S, MAX_CHECK_EVERY, StopWatch, _Sigterm, stop_file


class Clock:
    def __init__(self) -> None:
        self.now = 128.0  # binary fractions of a second throughout: the paces divide exactly

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(stop_module.time, "perf_counter", clock)
    monkeypatch.setattr(stop_module.time, "monotonic", clock)  # the cancel marker's poll
    return clock


@pytest.fixture
def watch(clock, tmp_path):
    watch = StopWatch(stop_file(tmp_path, "job"), rank=0, world_size=1)
    yield watch
    _Sigterm.received.clear()


def train(watch: StopWatch, clock: Clock, steps: range, step_s: float) -> list[int]:
    """Steps at ``step_s`` each; the steps after which the watch checked (it keeps ``next_check``)."""
    checked = []
    for step in steps:
        clock.now += step_s
        before = watch.next_check
        assert watch.check(step) is None
        if step >= before:
            checked.append(step)
    return checked


@pytest.mark.parametrize(
    ("step_s", "every"),
    [(2**-6, int(CHECK_INTERVAL_S * 2**6)), (2**-3, int(CHECK_INTERVAL_S * 2**3)), (2.0, 1), (2**-10, MAX_CHECK_EVERY)],
)
def test_the_checks_come_about_every_check_interval_at_the_pace_of_the_steps(watch, clock, step_s, every):
    checked = train(watch, clock, range(1, 400), step_s)
    assert checked[:2] == [1, 2]  # no pace yet: the first check proposes the next step
    assert watch.every == every
    gaps = {b - a for a, b in itertools.pairwise(checked[2:])}
    assert gaps == {every}


def test_a_slow_pause_between_checks_shortens_the_interval_and_the_pace_recovers(watch, clock):
    train(watch, clock, range(1, 200), 2**-6)
    assert watch.every == int(CHECK_INTERVAL_S * 2**6)
    clock.now += 30.0  # validation and a checkpoint between two checks
    step = watch.next_check
    watch.check(step)
    assert watch.every == 1
    train(watch, clock, range(step + 1, step + 200), 2**-6)
    assert watch.every == int(CHECK_INTERVAL_S * 2**6)


def test_a_sigterm_lands_at_the_next_check_and_says_when_it_was_asked(watch, clock):
    train(watch, clock, range(1, 100), 2**-6)  # checks every 32 steps from here
    next_check, every = watch.next_check, watch.every
    stop_module._on_sigterm(15, None)  # the handler, as the signal would run it
    for step in range(100, next_check):
        clock.now += 2**-6
        assert watch.check(step) is None
    clock.now += 2**-6
    stop = watch.check(next_check)
    assert stop is not None and stop.reason == "preempted"
    assert (stop.requested_at_step, stop.at_step, stop.check_every) == (99, next_check, every)
    assert stop.at_step - stop.requested_at_step <= stop.check_every


def test_a_cancel_marker_lands_as_cancelled_and_wins_over_a_preemption(watch, clock, tmp_path):
    train(watch, clock, range(1, 10), 2**-6)
    marker = stop_file(tmp_path, "job")
    marker.parent.mkdir(parents=True)
    marker.write_text("cancel")
    stop_module._on_sigterm(15, None)
    step, stop = 10, None
    while stop is None:
        clock.now += 2**-6
        stop = watch.check(step)
        step += 1
    assert stop.reason == "cancelled" and stop.requested_at_step <= stop.at_step
