"""A measurement taken in a background thread every ``interval_s`` while a ``with`` block runs."""

import threading


class PeriodicSampler:
    """Subclasses define `sample` (each interval) and may define `begin` (once, in the sampling thread, first)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def begin(self) -> None:
        pass

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        self.begin()
        while not self.stopped.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopped.set()
        self.thread.join()
