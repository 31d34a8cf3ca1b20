"""What the rest of the machine takes from training: every second, the CPU time of each process (psutil), split
into the training workers' and everything else's — Ray's daemons and actors, the driver, the kernel's threads."""

import statistics
import threading
import time

import psutil


def is_ray_train_worker(command: list[str]) -> bool:
    return bool(command) and command[0].startswith("ray::RayTrainWorker")


def is_spawned_process(command: list[str]) -> bool:
    """A process ``torch.multiprocessing.spawn`` started (multiprocessing's spawn start method)."""
    return any("spawn_main" in part for part in command)


class OtherCpu:
    """In a thread, each second: the workers' CPU seconds (processes ``is_worker`` accepts by command line) and every
    other process's. `busy_other` is the median of the others' over the seconds when the ``workers`` were training
    (together above 80 % of a core each), less this sampler's own CPU time. A command line is read at every sample:
    Ray starts a worker process as ``ray::IDLE`` and renames it when it becomes a Train worker."""

    def __init__(self, is_worker, workers: int, interval_s: float = 1.0) -> None:
        self.is_worker, self.workers, self.interval_s = is_worker, workers, interval_s
        self.seconds: list[tuple[float, float]] = []  # per interval: (workers', others') CPU seconds per second
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _times(self) -> dict[tuple[int, float], tuple[bool, float]]:
        found = {}
        for process in psutil.process_iter():
            try:
                times = process.cpu_times()
                found[(process.pid, process.create_time())] = (self.is_worker(process.cmdline()),
                                                               times.user + times.system)  # fmt: skip
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def _run(self) -> None:
        before, started, own = self._times(), time.perf_counter(), time.thread_time()
        while not self.stopped.wait(self.interval_s):
            now, at, own_now = self._times(), time.perf_counter(), time.thread_time()
            spent = {True: 0.0, False: -(own_now - own)}  # the sampler's own CPU is not the machine's overhead
            for key, (worker, seconds) in now.items():
                if key in before:
                    spent[worker] += seconds - before[key][1]
            self.seconds.append((spent[True] / (at - started), spent[False] / (at - started)))
            before, started, own = now, at, own_now

    @property
    def busy_other(self) -> float:
        busy = [other for workers, other in self.seconds if workers > 0.8 * self.workers]
        return statistics.median(busy) if busy else float("nan")

    def __enter__(self) -> "OtherCpu":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopped.set()
        self.thread.join()
