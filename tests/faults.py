"""Faults for the training tests, kept out of the training code: real signals to Ray Train's worker processes, found
through Ray's State API."""

import os
import signal
import threading
import time
from pathlib import Path

import ray
import ray.train
from ray.util.state import list_actors


def train_worker_pids() -> list[int]:
    """The PIDs of the live Ray Train worker processes (the `RayTrainWorker` actors) of the attached cluster."""
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this cluster's: another test's may run beside it
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
        raise_on_missing_output=False,
    )
    return sorted(actor.pid for actor in actors if actor.pid)


def checkpoints(run_dir: Path) -> list[Path]:
    """Ray Train's checkpoint directories of a run, oldest first."""
    paths = [path for path in Path(run_dir).glob("checkpoint_*") if path.is_dir()]  # not checkpoint_manager_*.json
    return sorted(paths, key=lambda path: path.stat().st_mtime)


class SignalWorker(threading.Thread):
    """In the background, while the job runs in the test's main thread: once ``run_dir`` holds ``after_checkpoints``
    of Ray's checkpoints (epochs reported) and ``delay_s`` more have passed, ``sig`` to one live Ray Train worker.
    `sent` holds (pid, time) afterwards, `error` what went wrong."""

    def __init__(self, run_dir: Path, sig: signal.Signals, after_checkpoints: int, delay_s: float,
                 timeout_s: float = 240) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.run_dir, self.sig, self.after, self.delay_s, self.timeout_s = (
            run_dir,
            sig,
            after_checkpoints,
            delay_s,
            timeout_s,
        )
        self.sent: tuple[int, float] | None = None
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.run_dir.is_dir() and len(checkpoints(self.run_dir)) >= self.after:
                time.sleep(self.delay_s)
                pids = train_worker_pids()
                if not pids:
                    self.error = "no live RayTrainWorker"
                    return
                os.kill(pids[-1], self.sig)
                self.sent = (pids[-1], time.time())
                return
            time.sleep(0.05)
        self.error = f"{self.after} checkpoints not within {self.timeout_s:.0f} s in {self.run_dir}"
