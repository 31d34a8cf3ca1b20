"""The attention modules' step-time ratios (× the bare model's) of this tree against another commit's, measured
interleaved: a probe process of each tree runs in turn, round by round, so the machine's drift falls on both. One run
of each compares two noisy figures (this VM's: ±5–9 % between runs an hour apart); the median over rounds of each
tree's ratio, and the spread of the rounds, tells a real change from noise.

    python bench/attention_ab.py --against COMMIT [--rounds 5] [--steps 150]

The other commit is checked out in a temporary git worktree (removed afterwards). The probe is this file run with
``--probe`` and the tree's own ``san`` first on its path, so it needs only what every commit has:
``san.registry.build_model``. It times LeNet-5 at 28 px, batch 64, channels-last, as bench/attention_overhead.py
does, each module at each placement as it runs in training (the fused paths), all variants interleaved step by step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [(a, p) for a in ("san-c", "cbam", "bam") for p in ("bottleneck", "full")]
BATCH, SIZE, WARMUP = 64, 28, 20


def probe(steps: int) -> dict[str, float]:
    """Each variant's median step time over the bare LeNet-5's, in the tree ``san`` is imported from."""
    import torch
    import torch.nn.functional as F

    from san.registry import build_model

    torch.manual_seed(0)
    x = torch.randn(BATCH, 1, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (BATCH,))
    built = {}
    for attention, placement in [("none", "bottleneck"), *VARIANTS]:
        model = build_model("lenet5", 10, attention=attention, placement=placement)
        model = model.to(memory_format=torch.channels_last)
        built[f"{attention} · {placement}"] = (
            model,
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True),
        )

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(WARMUP):
        for pair in built.values():
            step(*pair)
    samples: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(steps):
        for name, pair in built.items():
            samples[name].append(step(*pair))
    bare = statistics.median(samples["none · bottleneck"])
    return {name: statistics.median(times) / bare for name, times in samples.items() if not name.startswith("none")}


def run_probe(tree: Path, steps: int) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", "--steps", str(steps)]
    done = subprocess.run(
        command,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", metavar="COMMIT")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150, help="timed steps of each variant in a round")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.steps)))
        return
    if not args.against:
        parser.error("--against COMMIT is required")
    with tempfile.TemporaryDirectory(prefix="attention_ab_") as directory:
        other = Path(directory) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(other), args.against], cwd=ROOT, check=True, capture_output=True
        )
        try:
            runs: dict[str, list[dict[str, float]]] = {"against": [], "now": []}
            for index in range(args.rounds):
                for side, tree in (("against", other), ("now", ROOT)):
                    runs[side].append(run_probe(tree, args.steps))
                print(f"round {index + 1}/{args.rounds} done", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
    print(
        f"\nLeNet-5 @{SIZE} b{BATCH}, step time × bare, median (min–max) of {args.rounds} interleaved rounds of "
        f"{args.steps} steps: {args.against} against this tree\n"
    )
    print(f"| variant | {args.against} | now | change |")
    print("|---|---:|---:|---:|")
    for name in runs["now"][0]:
        before, after = ([run[name] for run in runs[side]] for side in ("against", "now"))
        shown = [f"{statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f})" for v in (before, after)]
        change = statistics.median(after) / statistics.median(before) - 1
        print(f"| {name} | {shown[0]} | {shown[1]} | {change:+.1%} |")


if __name__ == "__main__":
    main()
