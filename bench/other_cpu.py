"""What the rest of the machine takes from training: every second, the CPU time of each process (psutil), split
into the training workers' and everything else's — Ray's daemons and actors, the driver, the kernel's threads."""

import statistics
import time

import psutil

from bench.sampling import PeriodicSampler


def is_ray_train_worker(command: list[str]) -> bool:
    return bool(command) and command[0].startswith("ray::RayTrainWorker")


def is_spawned_process(command: list[str]) -> bool:
    """A process ``torch.multiprocessing.spawn`` started (multiprocessing's spawn start method)."""
    return any("spawn_main" in part for part in command)


class OtherCpu(PeriodicSampler):
    """In a thread, each second: the workers' CPU seconds (processes ``is_worker`` accepts by command line) and every
    other process's. `busy_other` is the median of the others' over the seconds when the ``workers`` were training
    (together above 80 % of a core each), less this sampler's own CPU time. A command line is read at every sample:
    Ray starts a worker process as ``ray::IDLE`` and renames it when it becomes a Train worker."""

    def __init__(self, is_worker, workers: int, interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self.is_worker, self.workers = is_worker, workers
        self.seconds: list[tuple[float, float]] = []  # per interval: (workers', others') CPU seconds per second

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

    def begin(self) -> None:
        self.before, self.started, self.own = self._times(), time.perf_counter(), time.thread_time()

    def sample(self) -> None:
        now, at, own = self._times(), time.perf_counter(), time.thread_time()
        spent = {True: 0.0, False: -(own - self.own)}  # the sampler's own CPU is not the machine's overhead
        for key, (worker, seconds) in now.items():
            if key in self.before:
                spent[worker] += seconds - self.before[key][1]
        self.seconds.append((spent[True] / (at - self.started), spent[False] / (at - self.started)))
        self.before, self.started, self.own = now, at, own

    @property
    def busy_other(self) -> float:
        busy = [other for workers, other in self.seconds if workers > 0.8 * self.workers]
        return statistics.median(busy) if busy else float("nan")
