"""What FFCV's numba compile costs a job, against running the same pipeline as Python: the figures behind
`training.data.loaders.JIT_MIN_IMAGES` (a loader that will read fewer images over its job runs uncompiled).

Each sample is a fresh process (numba keeps what it compiled for the process's life), on the embedded
Fashion-MNIST's pipelines as a LeNet-5 job builds them (28 px, translate and flip for training; 1 channel):
- compiled: the first batch's time (the compile, which FFCV does on it) and the images/s of the epochs after it;
- uncompiled: the images/s from the first batch on.
The break-even is compile / (1/uncompiled rate − 1/compiled rate): fewer images than that over a job, and Python is
the faster start.

    python bench/loader_jit.py [--images 2048] [--repeats 3] [--quick] [--json PATH]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import Row, measured, parse_args, this_command, write_rows
from training.data.build import build_dataset
from training.data.loaders import JIT_MIN_IMAGES
from training.data.writer import WriterOptions

SAMPLE = r"""
import json, sys, time
from training.data import loaders

path, train, enabled = sys.argv[1], sys.argv[2] == "train", sys.argv[3] == "compiled"
loaders.compiles = lambda *args: enabled  # the mode under test, whatever the rule would pick
loader = loaders.make_loader(path, train=train, batch_size=64, in_chans=1, seed=0)
start = time.perf_counter()
batches = iter(loader)
next(batches)
first = time.perf_counter() - start
start, count = time.perf_counter(), 0
for _ in range(3):
    for images, _ in loader:
        count += len(images)
print(json.dumps({"first_s": first, "rate": count / (time.perf_counter() - start)}))
"""


def sample(path: Path, train: bool, compiled: bool) -> dict:
    argv = [sys.executable, "-c", SAMPLE, str(path), "train" if train else "val", "compiled" if compiled else "python"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="of the Fashion-MNIST training split")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per pipeline and mode")
    args = parse_args(parser, quick={"repeats": 2})
    rows, command = [], this_command()
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "fmnist"
        build_dataset("fashion-mnist", None, out, WriterOptions(num_workers=1, subset=args.images))
        print("\nFFCV's compile against Python, Fashion-MNIST 28 px, batch 64, 1 loader thread, fresh processes\n")
        print("| pipeline | compile (first batch) s | compiled img/s | Python img/s | break-even images | set at |")
        print("|---|---:|---:|---:|---:|---:|")
        for train, split in ((True, "train"), (False, "val")):
            runs = {mode: [] for mode in (True, False)}
            for _ in range(args.repeats):
                for mode in (True, False):  # alternating: the machine's drift falls on both
                    runs[mode].append(sample(out / f"{split}.beton", train, mode))
            compile_s = [r["first_s"] for r in runs[True]]
            compiled_rate, python_rate = ([r["rate"] for r in runs[mode]] for mode in (True, False))
            per_image = 1 / statistics.median(python_rate) - 1 / statistics.median(compiled_rate)
            even = statistics.median(compile_s) / per_image
            factor = JIT_MIN_IMAGES[train] / even
            print(
                f"| {split} | {statistics.median(compile_s):.2f} | {statistics.median(compiled_rate):,.0f} | "
                f"{statistics.median(python_rate):,.0f} | {even:,.0f} | {JIT_MIN_IMAGES[train]:,} |"
            )
            rows += [
                measured(
                    "loader",
                    f"fmnist 28 px {split} pipeline · numba compile (first batch)",
                    compile_s,
                    "s",
                    command=command,
                    note="fresh process each",
                ),
                measured(
                    "loader",
                    f"fmnist 28 px {split} pipeline · uncompiled",
                    python_rate,
                    "img/s",
                    command=command,
                    note=f"compiled: {statistics.median(compiled_rate):,.0f} img/s",
                ),
                Row(
                    "loader",
                    f"fmnist 28 px {split} pipeline · JIT_MIN_IMAGES against the break-even",
                    max(factor, 1 / factor),
                    "×",
                    target=("<=", 2.0),
                    command=command,
                    note=f"{JIT_MIN_IMAGES[train]:,} set, {even:,.0f} measured: within 2× either way, the wrong "
                    "choice costs at most one compile's time",
                ),
            ]
    if args.json:
        write_rows(args.json, rows)


if __name__ == "__main__":
    main()
