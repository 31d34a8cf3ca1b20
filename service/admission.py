"""Admission checks that build models, in a worker process.

Expanding a study builds each cell's network on the meta device (up to `max_study_cells` of them, ~25 ms each for a
ResNet-50). In the API's process that held the GIL — `/healthz` went unanswered — and grew its memory with every
study. Here it runs in one spawned process, one check at a time, each bounded by ``timeout_s``: past it, the worker is
killed, a fresh one started, and the request refused. The API process keeps answering meanwhile.
"""

import logging
import multiprocessing
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from training.config import count_model_params

log = logging.getLogger("san.service")
T = TypeVar("T")
READY = "ready"
STARTUP_S = 300.0  # the worker's imports (torch, MLflow): outside each check's bound, but not forever


class AdmissionUnavailable(RuntimeError):
    """The worker could not answer: not a verdict on the request (HTTP 503, try again)."""


class CheckTimeout(AdmissionUnavailable):
    """A check ran past its bound (the worker was killed for it)."""


class WorkerLost(AdmissionUnavailable):
    """The worker ended in the middle of a check (killed from outside, or out of memory), or could not start."""


class WorkerBusy(AdmissionUnavailable):
    """Other checks held the worker for longer than a check's bound: the request is not queued behind them."""


def serve(connection: Connection) -> None:
    """The worker: imports what every check needs once, then answers (check, args) with (True, result) or
    (False, exception) until the API closes its end."""
    import service.studies  # noqa: F401
    import training.study  # noqa: F401

    connection.send(READY)
    while True:
        try:
            check, args = connection.recv()
        except (EOFError, OSError):  # the API process ended or closed the pipe
            return
        try:
            answer: tuple[bool, Any] = (True, check(*args))
        except Exception as error:
            answer = (False, error)
        try:
            connection.send(answer)
        except Exception as error:  # an exception that does not pickle crosses as its words
            connection.send((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]} ({error})")))


class ModelChecks:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # one check at a time: killing a worker must not take another's check with it
        self._worker: BaseProcess | None = None
        self._connection: Connection | None = None
        self._ready = False

    def start(self) -> None:
        """Spawn the worker now (it warms up in the background)."""
        with self._lock:
            self._started()

    def _started(self) -> Connection:
        if self._worker is None or not self._worker.is_alive() or self._connection is None:
            self._stop()
            # spawn, never fork: the API process holds threads (the event loop's, SQLite's, httpx's)
            context = multiprocessing.get_context("spawn")
            ours, theirs = context.Pipe()
            self._worker = context.Process(target=serve, args=(theirs,), name="san-admission", daemon=True)
            self._worker.start()
            theirs.close()
            self._connection, self._ready = ours, False
        return self._connection

    def _stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._worker is not None:
            self._worker.kill()
            self._worker.join()
            self._worker = None

    def run(self, check: Callable[..., T], *args: Any) -> T:
        """``check(*args)`` in the worker (a module-level function; its arguments and result cross by pickle), or
        its exception; `CheckTimeout` past the bound. Blocks: call it from a thread, never the event loop."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise WorkerBusy(f"the admission worker was busy with other checks for {self.timeout_s:g} s")
        try:
            try:
                connection = self._started()
                if not self._ready:
                    if not connection.poll(STARTUP_S) or connection.recv() != READY:
                        self._stop()
                        raise WorkerLost(f"the admission worker did not start within {STARTUP_S:g} s")
                    self._ready = True
                connection.send((check, args))
                if not connection.poll(self.timeout_s):
                    log.warning("admission check %s ran past %g s: worker restarted", check.__name__, self.timeout_s)
                    self._stop()
                    raise CheckTimeout(f"checking it took longer than this service's bound of {self.timeout_s:g} s")
                ok, value = connection.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                self._stop()
                raise WorkerLost("the admission worker ended during the check; try again") from None
        finally:
            self._lock.release()
        if not ok:
            raise value
        return value

    def ping(self) -> str:
        """Whether the worker has started (never waits for it, nor for a check in progress); RuntimeError if not."""
        if not self._lock.acquire(timeout=1):
            return "checking"  # busy with a check: started
        try:
            connection = self._started()
            if not self._ready:
                if not connection.poll(0):
                    raise RuntimeError("the admission worker is starting")
                if connection.recv() != READY:
                    self._stop()
                    raise RuntimeError("the admission worker did not start")
                self._ready = True
            return "ready"
        except (EOFError, OSError):
            self._stop()
            raise RuntimeError("the admission worker ended; it restarts at the next check") from None
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._stop()


class ModelRefused(ValueError):
    """The model's constructors refused the spec's settings (on the meta device, in the worker)."""


class ModelSizes:
    """Parameter counts of the models jobs name, counted in the admission worker once per (model section, data
    shape) — a constructor's refusal too — and kept for the last ``keep`` of them: the API process builds no model."""

    def __init__(self, checks: ModelChecks, keep: int = 1024) -> None:
        self.checks, self.keep = checks, keep
        self._kept: OrderedDict[tuple[str, int, int], int | str] = OrderedDict()  # params, or why it was refused
        self._lock = threading.Lock()

    def known(self, key: tuple[str, int, int]) -> int | None:
        """The count when it is kept (never blocks: for the event loop), else None; `ModelRefused` for a refusal."""
        with self._lock:
            found = self._kept.get(key)
            if found is not None:
                self._kept.move_to_end(key)
        if isinstance(found, str):
            raise ModelRefused(f"model: {found}")
        return found

    def params(self, key: tuple[str, int, int]) -> int:
        """``key``: `JobSpec.model_key`. `ModelRefused` naming the constructor's reason; blocks (a thread)."""
        found: int | str | None = self.known(key)
        if found is None:
            try:
                found = self.checks.run(count_model_params, *key)
            except AdmissionUnavailable:  # not a verdict: never kept
                raise
            except Exception as error:  # raised by the check itself: a constructor's refusal of the kwargs
                found = str(error)
            with self._lock:
                self._kept[key] = found
                while len(self._kept) > self.keep:
                    self._kept.popitem(last=False)
        if isinstance(found, str):
            raise ModelRefused(f"model: {found}")
        return found
