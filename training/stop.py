"""Stopping a job at a step boundary, with a checkpoint. Two requests, one mechanism:

- *preemption*: SIGTERM to a Ray Train worker (a spot or preemption notice). Its handler records the request; the
  workers checkpoint the step they are at and fail on purpose, so Ray Train restarts them from that checkpoint.
- *cancel*: SIGTERM to the driver (Ray Jobs' ``stop_job``, a pod's termination, ``kill``). `StopOnSignal` writes a
  marker file under the storage root that rank 0 watches; the workers checkpoint and return, and the driver ends
  the MLflow run as KILLED.

``ray.train.report`` is a barrier, so every rank must stop at the same step: `StopWatch.check` combines the ranks'
requests with one all_reduce (3 int64 over gloo) every few steps — as many as take ≈ `CHECK_INTERVAL_S`, agreed
across ranks at each check — and a stop lands within ≈ that much training (at the next step when steps are slower).
The all_reduce is a second meeting point per check besides DDP's gradient one: a rank that arrives first blocks and
its CPU is woken milliseconds later. Checked every ≈ 50 ms that cost 3 % of 2 CPU workers' training time (timing
the check's all_reduce in bench/ray_overhead.py's 2-worker LeNet-5 run, 2026-12-02: 0.45 s blocked in 320 checks,
one per 46 ms step, of 15 s of training); every ≈ 0.5 s it costs a tenth of that."""

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED, CANCELLED = 1, 2  # the larger wins when the ranks' requests are combined
REASONS = {PREEMPTED: "preempted", CANCELLED: "cancelled"}
MARKER_POLL_S = 0.2  # rank 0 looks for the cancel marker at most this often (a stat on a shared filesystem)
CHECK_INTERVAL_S = 0.5  # the ranks agree on a stop about this often
MAX_CHECK_EVERY = 64  # steps


class Preempted(RuntimeError):
    """Raised by every worker after the preemption checkpoint: Ray Train restarts the group from it (counted
    against ``checkpoint.max_failures``)."""


class Cancelled(BaseException):
    """Raised by `training.launch.launch` once a cancelled job has its checkpoint and its run is KILLED. Like
    KeyboardInterrupt, it passes ``except Exception``: a driver running several jobs (a study) stops too."""

    def __init__(self, result) -> None:
        super().__init__(f"{result.job_id}: cancelled")
        self.result = result  # the JobResult: its checkpoint is the stop's


def stop_file(storage_root: Path, job_id: str) -> Path:
    """The cancel marker of ``job_id``: on the storage root, which every node of a cluster shares."""
    return Path(storage_root) / "stop" / job_id


@dataclass(frozen=True)
class Stop:
    reason: str  # "preempted" or "cancelled"
    at_step: int  # global optimizer steps done when every rank stopped (epoch × iterations + step)
    requested_at_step: int  # global steps done when the request was seen (the signal arrived, the marker appeared)
    check_every: int  # steps between the ranks' checks when it was agreed: at_step - requested_at_step <= this


class _Sigterm:
    """Set by the handler on the worker's main thread, read by the training thread."""

    received = threading.Event()
    at_step = 0  # `step` when the signal arrived
    step = 0  # global steps done, kept current by `StopWatch.check`


def _on_sigterm(signum, frame) -> None:
    if not _Sigterm.received.is_set():
        _Sigterm.at_step = _Sigterm.step
        _Sigterm.received.set()


def _install_sigterm_handler() -> str:
    signal.signal(signal.SIGTERM, _on_sigterm)
    return threading.current_thread().name


def catch_sigterm_in_worker() -> bool:
    """Make SIGTERM to this Ray Train worker a stop request instead of Ray's immediate exit. A Python signal handler
    is set on, and runs on, the process's main thread; Ray Train runs the training function on a thread of its own
    and keeps the actor's main thread serving the actor's methods, so the handler is set through a call to this
    worker's own actor (`RayTrainWorker.execute`). False, with a warning, where that is not possible."""
    _Sigterm.received.clear()
    _Sigterm.at_step = _Sigterm.step = 0
    if not ray.is_initialized():  # not in a worker; and get_runtime_context() would start a local Ray instance
        log.warning("SIGTERM stays the immediate exit (no checkpoint on preemption): not in a Ray Train worker")
        return False
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_sigterm_handler), timeout=30)
        return True
    except Exception as error:  # not in a Ray Train worker, or an actor without `execute`
        log.warning("SIGTERM stays Ray's immediate exit (no checkpoint on preemption): %s", error)
        return False


class StopWatch:
    """Each rank calls `check` after every optimizer step; all ranks get the same answer at the same step."""

    def __init__(self, marker: str | Path | None, rank: int, world_size: int) -> None:
        self.marker = Path(marker) if marker and rank == 0 else None
        self.distributed = world_size > 1 and dist.is_initialized()
        # The flag travels over gloo on the CPU: on NCCL it would cost a device synchronisation per step.
        self.group = dist.new_group(backend="gloo") if self.distributed and dist.get_backend() != "gloo" else None
        self.next_marker_check = 0.0
        self.cancel_seen_at: int | None = None
        self.flags = torch.zeros(3, dtype=torch.int64)
        self.every, self.next_check, self.last_check = 1, -1, None
        catch_sigterm_in_worker()

    def _local(self, step: int) -> tuple[int, int]:
        if self.cancel_seen_at is None and self.marker is not None:
            now = time.monotonic()
            if now >= self.next_marker_check:
                self.next_marker_check = now + MARKER_POLL_S
                if os.path.exists(self.marker):
                    self.cancel_seen_at = step
        if self.cancel_seen_at is not None:
            return CANCELLED, self.cancel_seen_at
        if _Sigterm.received.is_set():
            return PREEMPTED, _Sigterm.at_step
        return 0, 0

    def check(self, step: int) -> Stop | None:
        """``step``: global optimizer steps done (every rank passes the same sequence). A `Stop` when any rank was
        asked to stop, seen at a check: every `every` steps."""
        _Sigterm.step = step
        if step < self.next_check:
            return None
        now = time.perf_counter()
        proposed = 1  # the steps that take about CHECK_INTERVAL_S, at the pace since the last check
        if self.last_check is not None and step > self.last_check[0] and now > self.last_check[1]:
            pace = (now - self.last_check[1]) / (step - self.last_check[0])
            proposed = max(1, min(MAX_CHECK_EVERY, int(CHECK_INTERVAL_S / pace)))
        self.last_check = (step, now)
        every = self.every
        reason, seen_at = self._local(step)
        if self.distributed:  # MAX of the requests, and of -proposed: the smallest interval any rank proposes
            self.flags[0], self.flags[1], self.flags[2] = reason, seen_at, -proposed
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, group=self.group)
            reason, seen_at, proposed = (int(value) for value in self.flags.tolist())
            proposed = -proposed
        self.every, self.next_check = proposed, step + proposed
        return Stop(REASONS[reason], step, seen_at, every) if reason else None


class StopOnSignal:
    """In the driver, around ``fit()``: SIGTERM becomes a cancel — the marker the workers watch is written and
    ``on_stop`` runs (the launcher ends the MLflow run KILLED there, so a driver killed before ``fit()`` returns
    still leaves no RUNNING run). Ray's own driver handler (``sys.exit``) is restored afterwards. Only on the main
    thread, where Python allows signal handlers; elsewhere SIGTERM keeps its handler."""

    def __init__(self, marker: Path, on_stop=None) -> None:
        self.marker, self.on_stop = Path(marker), on_stop
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopOnSignal":
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.unlink(missing_ok=True)  # a previous attempt's, killed before it could clean up
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        first, self.requested = not self.requested, True
        self.marker.write_text(f"SIGTERM to the driver, pid {os.getpid()}, at {time.time():.3f}\n")
        if first:
            log.warning("SIGTERM: stopping at the next agreed step boundary with a checkpoint")
            if self.on_stop:
                self.on_stop()

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        self.marker.unlink(missing_ok=True)
