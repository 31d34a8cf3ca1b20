"""The attention benchmark's step-time ratios of this tree against another commit's, measured interleaved: the two
trees' `bench/attention_overhead.py` run alternately, round by round, so the machine's drift falls on both. One run
of each compares two noisy figures (this VM's: ±5–9 % between runs an hour apart); the median over rounds of each
tree's ratio, and the spread of the rounds, tells a real change from noise.

    python bench/attention_ab.py --against COMMIT [--rounds 3] [--cases lenet5@28]

The other commit is checked out in a temporary git worktree (removed afterwards); each tree builds its own C
kernels (their cache is keyed by the source).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP = " · step time"


def ratios(tree: Path, cases: list[str], out: Path) -> dict[str, float]:
    """Each fused variant's step time × the bare model's, from one run of ``tree``'s benchmark."""
    command = [sys.executable, "bench/attention_overhead.py", "--cases", *cases, "--json", str(out)]
    subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                   stdout=subprocess.DEVNULL, timeout=1800)  # fmt: skip
    rows = json.loads(out.read_text())
    return {r["name"].removesuffix(STEP): r["ratio"] for r in rows if r["name"].endswith(STEP) and "fused" in r["name"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, metavar="COMMIT")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["lenet5@28"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="attention_ab_") as directory:
        other = Path(directory) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.against], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            runs: dict[str, list[dict[str, float]]] = {"against": [], "now": []}
            for index in range(args.rounds):
                for side, tree in (("against", other), ("now", ROOT)):
                    runs[side].append(ratios(tree, args.cases, Path(directory) / f"{side}-{index}.json"))
                    print(f"round {index + 1}/{args.rounds}: {side} done", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
    rounds = f"median (min–max) of {args.rounds} interleaved runs each"
    print(f"\nStep time × bare, {rounds}: {args.against} against this tree\n")
    print(f"| variant | {args.against} | now | change |")
    print("|---|---:|---:|---:|")
    for name in runs["now"][0]:
        before, after = ([run[name] for run in runs[side] if name in run] for side in ("against", "now"))
        if not before:
            continue
        shown = [f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})" for v in (before, after)]
        change = statistics.median(after) / statistics.median(before) - 1
        print(f"| {name} | {shown[0]} | {shown[1]} | {change:+.1%} |")


if __name__ == "__main__":
    main()
