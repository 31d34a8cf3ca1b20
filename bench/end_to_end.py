"""The demo study end to end, as `make demo` runs it: Table IV (LeNet-5 with each attention module on
Fashion-MNIST) submitted through the API by deploy/study-demo.sh, which starts and stops an mlflow server and
`san serve` with its own Ray head. Reported: each module's wall time per epoch (its run's ``time/epoch_s`` in
MLflow, the epochs after the first, which pays FFCV's compilation) against the base model's, the study's wall
time, and the whole stack's peak memory: the sum of the RSS of every process of the demo (API, mlflow server, Ray
head, its workers, the CLI), sampled while it runs.

    python bench/end_to_end.py [--images 20000] [--epochs 3] [--quick] [--json PATH]
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import ROOT, Row, measured, parse_args, this_command, write_rows
from bench.sampling import PeriodicSampler
from tests.services import free_port
from tests.test_demo import started_here  # which processes belong to a demo: its storage root, inherited
from training.data.build import build_dataset
from training.data.writer import WriterOptions
from training.study_results import observations

STUDY = "configs/studies/table4-fmnist.yaml"
ATTENTION = "model.attention"


class PeakMemory(PeriodicSampler):
    """The peak over time of the summed RSS of the processes that ``belongs`` accepts, sampled every
    ``interval_s`` in a thread; each process is asked once whether it belongs. Beside it, the peak rise of the
    machine's used memory: RSS counts the pages that processes share (torch's libraries, mostly) once each."""

    def __init__(self, belongs, interval_s: float = 0.5) -> None:
        super().__init__(interval_s)
        self.belongs = belongs
        self.known: dict[tuple[int, float], bool] = {}
        self.peak_bytes, self.peak_processes = 0, 0
        self.used_before, self.peak_used_rise = psutil.virtual_memory().used, 0

    def sample(self) -> None:
        total, count = 0, 0
        for process in psutil.process_iter():
            try:
                key = (process.pid, process.create_time())
                if key not in self.known:
                    self.known[key] = self.belongs(process)
                if self.known[key]:
                    total += process.memory_info().rss
                    count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, count
        self.peak_used_rise = max(self.peak_used_rise, psutil.virtual_memory().used - self.used_before)


def run_demo(root: Path, images: int, epochs: int) -> tuple[str, float, PeakMemory]:
    """The demo on ``images`` Fashion-MNIST images (all: 0), each run ``epochs`` epochs: its output, its wall time
    and the stack's memory."""
    data = root / "data" / "fashion-mnist"  # where the demo study's catalog name resolves under SAN_DATA_ROOT
    build_dataset("fashion-mnist", None, data, WriterOptions(num_workers=2, subset=images or None))
    env = {**os.environ, "SAN_DATA_ROOT": str(root / "data"), "SAN_STORAGE_ROOT": str(root / "runs"),
           "SAN_DEMO_PORT": str(free_port()), "SAN_DEMO_MLFLOW_PORT": str(free_port()),
           "SAN_LOCAL_RAY_PORT": str(free_port()), "SAN_LOCAL_RAY_DASHBOARD_PORT": str(free_port())}  # fmt: skip
    command = ["deploy/study-demo.sh", STUDY, "--seeds", "1", "--epochs", str(epochs)]
    lines = []
    with PeakMemory(lambda process: started_here(process, env)) as memory:
        started = time.monotonic()
        demo = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        try:
            for line in demo.stdout:
                print(line, end="", flush=True)
                lines.append(line)
            demo.wait()
        finally:
            if demo.poll() is None:  # interrupted: its trap stops the stack it started
                demo.terminate()
                demo.wait(60)
        seconds = time.monotonic() - started
    if demo.returncode:
        raise SystemExit(f"the demo failed (exit {demo.returncode})")
    return "".join(lines), seconds, memory


def epoch_seconds(storage: Path, study_id: str) -> tuple[dict[str, list[float]], str | None]:
    """Per module (its label in the study's table), every ``time/epoch_s`` of its runs from the demo's MLflow
    store; and the label of the module without attention, the baseline."""
    cells = json.loads((storage / "studies" / study_id / "table.json").read_text())["cells"]
    labels = {cell["key"]: cell["labels"].get(ATTENTION, cell["key"]) for cell in cells}
    base = next((labels[cell["key"]] for cell in cells if cell["values"].get(ATTENTION) == "none"), None)
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`san.study_id` = '{study_id}' and tags.`san.kind` = 'study'"
    parent = client.search_runs(experiments, query, max_results=1)[0]
    found: dict[str, list[float]] = {}
    for observation in sorted(observations(uri, parent.info.run_id), key=lambda o: o.cell):
        times = [row["time/epoch_s"] for row in observation.history if "time/epoch_s" in row]
        found.setdefault(labels.get(observation.cell, observation.cell), []).extend(times)
    return found, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="Fashion-MNIST training images (0: all 60,000)")
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is not timed")
    args = parse_args(parser, quick={"images": 3000, "epochs": 3})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the demo's own trap gets to stop its stack
    with tempfile.TemporaryDirectory(prefix="san-e2e-") as temp:
        root = Path(temp).resolve()
        out, seconds, memory = run_demo(root, args.images, args.epochs)
        study_id = Path(re.search(r"tables and figures: (\S+)/", out)[1]).name
        per_module, base = epoch_seconds(root / "runs", study_id)
    print(f"\nthe demo study, {args.images or 60000:,} images, {args.epochs} epochs per run: {seconds:.0f} s; "
          f"stack peak {memory.peak_bytes / 2**20:,.0f} MiB RSS over {memory.peak_processes} processes (the "
          f"machine's used memory: at most +{memory.peak_used_rise / 2**20:,.0f} MiB)\n")  # fmt: skip
    print("| module | epoch s (after the first) |")
    print("|---|---:|")
    for label, times in per_module.items():
        print(f"| {label} | {statistics.median(timed(times)):.2f} |")
    if args.json:
        write_rows(args.json, report_rows(per_module, base, seconds, memory, args))


def timed(times: list[float]) -> list[float]:
    return times[1:] or times


def report_rows(per_module: dict[str, list[float]], base: str | None, seconds: float, memory: PeakMemory,
                args) -> list[Row]:  # fmt: skip
    command, images = this_command(), args.images or 60000
    base_s = statistics.median(timed(per_module[base])) if base in per_module else None
    rows = [
        measured("end-to-end", f"{label} · wall time per epoch", timed(times), "s", command=command,
                 baseline=None if label == base else base,
                 ratio=None if label == base or not base_s else statistics.median(timed(times)) / base_s,
                 note=f"{images:,} images, batch 128, 1 worker × 2 CPUs; first epoch {times[0]:.1f} s")
        for label, times in per_module.items()
    ]  # fmt: skip
    rows += [
        Row("end-to-end", "the demo study · wall time", seconds, "s", command=command,
            note=f"{len(per_module)} runs × {args.epochs} epochs through the API, the stack's start and stop "
                 "included"),
        Row("end-to-end", "the whole stack · peak memory", memory.peak_bytes / 2**20, "MiB", command=command,
            note=f"sum of RSS over {memory.peak_processes} processes (API, mlflow server, Ray head and workers, "
                 "CLI), sampled every 0.5 s; pages shared between processes count once per process: the "
                 f"machine's used memory rose by at most {memory.peak_used_rise / 2**20:,.0f} MiB"),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
