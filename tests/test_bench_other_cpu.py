"""bench/other_cpu.py: the training workers' CPU and the rest of the machine's, told apart by command line."""

import subprocess
import sys
import time

import psutil

from bench.other_cpu import OtherCpu, is_ray_train_worker, is_spawned_process

INTERVAL_S = 0.25


def busy_loop(marker: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass", marker])


def cpu_seconds(process: subprocess.Popen) -> float:
    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


def spin_until(enough, at_least_s: float, at_most_s: float = 20.0) -> None:
    """Sleep ``at_least_s``, then on until ``enough()`` or ``at_most_s``: on a loaded machine (CI runs the Ray tests
    beside these) a busy loop can get a third of a core, so the window lasts until each loop has spent what the
    assertions need, instead of a fixed time."""
    deadline = time.monotonic() + at_most_s
    time.sleep(at_least_s)
    while not enough() and time.monotonic() < deadline:
        time.sleep(0.25)


def test_the_workers_cpu_and_the_rest_are_each_processs_own_cpu_time():
    """Two busy loops, one a "worker": over the sampled seconds the workers' CPU adds up to that loop's own CPU
    time and the rest's to at least the other loop's, whatever else this machine runs meanwhile."""
    worker, other = busy_loop("worker-marker"), busy_loop("other-marker")
    try:
        time.sleep(0.5)  # both started and spinning
        with OtherCpu(lambda command: "worker-marker" in command, workers=1, interval_s=INTERVAL_S) as cpu:
            before = cpu_seconds(worker), cpu_seconds(other)
            spin_until(lambda: min(cpu_seconds(worker) - before[0], cpu_seconds(other) - before[1]) > 0.75, 2.5)
            after = cpu_seconds(worker), cpu_seconds(other)
    finally:
        for process in (worker, other):
            process.kill()
            process.wait()
    sampled_workers = sum(workers * INTERVAL_S for workers, _ in cpu.seconds)
    sampled_rest = sum(rest * INTERVAL_S for _, rest in cpu.seconds)
    worker_spent, other_spent = after[0] - before[0], after[1] - before[1]
    assert len(cpu.seconds) >= 8 and worker_spent > 0.5 and other_spent > 0.5, (before, after)
    # the sampled intervals lie within the measured window but for the last partial one
    assert worker_spent - 2 * INTERVAL_S <= sampled_workers <= worker_spent + 2 * INTERVAL_S, cpu.seconds
    assert sampled_rest >= other_spent - 2 * INTERVAL_S, cpu.seconds


def test_a_process_renamed_into_a_worker_counts_as_one_from_then_on(tmp_path):
    """As Ray's ``ray::IDLE`` process becomes ``ray::RayTrainWorker``: whether a process is a worker is its command
    line's answer at each sample, not at the first one. Measured against the loop's own CPU time after the rename,
    not against a share of a core, which a busy machine need not give it."""
    renamed = tmp_path / "renamed"
    loop = busy_loop("idle-marker")
    try:
        time.sleep(0.5)  # started and spinning
        with OtherCpu(lambda command: "idle-marker" in command and renamed.exists(), workers=1,
                      interval_s=INTERVAL_S) as cpu:  # fmt: skip
            time.sleep(1.0)
            at_rename = cpu_seconds(loop)
            renamed.touch()
            spin_until(lambda: cpu_seconds(loop) - at_rename > 0.75, 2.5)
            spent = cpu_seconds(loop) - at_rename
    finally:
        loop.kill()
        loop.wait()
    sampled_workers = sum(workers * INTERVAL_S for workers, _ in cpu.seconds)
    assert spent > 0.5 and len(cpu.seconds) >= 12, (spent, cpu.seconds)
    assert cpu.seconds[0][0] == cpu.seconds[1][0] == 0.0, cpu.seconds  # before the rename: not a worker
    # after it, a worker: the whole of its CPU from then on, within the interval the rename falls in and the last
    assert spent - 2 * INTERVAL_S <= sampled_workers <= spent + 2 * INTERVAL_S, (spent, cpu.seconds)


def test_the_workers_are_recognised_by_their_command_lines():
    assert is_ray_train_worker(["ray::RayTrainWorker.run_train_fn"]) and not is_ray_train_worker(["ray::IDLE"])
    assert not is_ray_train_worker([])
    spawned = ["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)"]
    assert is_spawned_process(spawned) and not is_spawned_process(["python", "bench/ray_overhead.py"])
