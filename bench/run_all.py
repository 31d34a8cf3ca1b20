"""``make bench``: every benchmark in its own process, each writing its figures as report rows, then
results/BENCHMARKS.md (the machine, each command, every figure against its baseline and target).
A benchmark that fails is a failed section with the tail of its output; the others still run.

    python bench/run_all.py [--quick] [--only NAME ...] [--out results/BENCHMARKS.md]
"""

import argparse
import collections
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import (
    COMMANDS,
    ROOT,
    Row,
    failed_row,
    machine_info,
    read_rows,
    render_markdown,
    write_rows,
    write_text_atomic,
)

RESULTS = ROOT / "bench" / "results"
TAIL_LINES = 30


@dataclass
class Script:
    section: str
    name: str  # the results file's stem
    args: list[str]  # the script and its arguments, relative to the repository root
    quick_args: list[str] = field(default_factory=lambda: ["--quick"])
    timeout_s: float | None = None  # in quick mode only: a hung benchmark must not eat the others' budget
    json: bool = True  # False: the script writes no rows (bench/gpu.py writes its own gpu.json)


SCRIPTS = [
    Script("loader", "loader", ["bench/loader.py"], timeout_s=150),
    Script("loader", "loader_jit", ["bench/loader_jit.py"], timeout_s=150),
    Script("attention", "attention", ["bench/attention_overhead.py"], timeout_s=270),
    Script("attention kernels", "bam_torch_ops", ["bench/bam_torch_ops.py"], timeout_s=120),
    Script("memory format", "memory_format", ["bench/memory_format.py"], timeout_s=90),
    Script("ray", "ray", ["bench/ray_overhead.py"], timeout_s=240),
    Script("api", "api-sqlite", ["bench/api_latency.py"], timeout_s=60),
    Script("api", "api-postgresql", ["bench/api_latency.py", "--database", "postgresql"], timeout_s=90),
    Script("api", "api-reads", ["bench/api_reads.py"], timeout_s=120),
    Script("end-to-end", "end_to_end", ["bench/end_to_end.py"], timeout_s=330),
    Script("gpu", "gpu", ["bench/gpu.py", "--out", "bench/results/gpu"], quick_args=[], timeout_s=60, json=False),
]


def shown(argv: list[str]) -> str:
    return shlex.join([".venv/bin/python", *argv])


def run_script(argv: list[str], log: Path, timeout_s: float | None) -> tuple[int | None, str]:
    """Runs ``argv`` in its own process group, its output to this terminal and to ``log``; the exit status
    (None: timed out, its group killed) and the last lines of its output."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with open(log, "w") as file:
        process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip

        def copy() -> None:
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                file.write(line)
                tail.append(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            status: int | None = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            status = None
            stop_group(process)
        except BaseException:  # Ctrl-C reaches only this process: the benchmark runs in its own session
            stop_group(process)
            raise
        reader.join(10)
    return status, "".join(tail)


def stop_group(process: subprocess.Popen) -> None:
    """TERM to its whole group first, so the demo's trap and `san serve` stop the servers they started."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def gpu_rows(script: Script, results: Path) -> list[Row]:
    """The figures of bench/gpu.py's gpu.json where it ran on a GPU (here, or earlier on a GPU machine), and a
    row saying so where this machine has none."""
    found, command = results / "gpu" / "gpu.json", shown(script.args)
    data = json.loads(found.read_text()) if found.exists() else {"dry_run": True}
    rows = [] if data["dry_run"] else gpu_json_rows(data, script.section, command)
    if machine_info()["GPU"] == "none":
        where = f"the rows here are from {found.relative_to(ROOT)}, an earlier run" if rows else "bench/gpu.py skipped"
        rows.append(Row(script.section, "no GPU on this machine", math.nan, "", note=where, command=command))
    return rows


def _worst(errors: dict[str, float | None]) -> float:
    return math.nan if any(e is None for e in errors.values()) else max(errors.values(), default=math.nan)


def gpu_json_rows(data: dict, section: str, command: str) -> list[Row]:
    """gpu.json's train steps (img/s against the bare model), GPU-vs-CPU and fused-vs-reference checks (the worst
    relative error against the tolerance) as rows; its gpu.md beside it has every column."""
    machine = data["machine"]
    about = (f"{machine.get('gpu')}; torch {machine.get('torch')}, CUDA {machine.get('cuda')}; "
             f"{machine.get('date_utc')}; status {data.get('status')}; all columns: gpu.md")  # fmt: skip
    rows = [Row(section, "GPU machine · wall time", data.get("elapsed_s", math.nan), "s", note=about, command=command)]
    base = {(row["model"], mode): row[mode].get("img_per_s") for row in data.get("train", [])
            if row["attention"] == "none" for mode in ("eager", "compiled")}  # fmt: skip
    for row in data.get("train", []):
        for mode in ("eager", "compiled"):
            result, name = row[mode], f"{row['model']}@{row['size']} · {row['attention']} · {mode} · train step"
            speed, base_speed = result.get("img_per_s"), base.get((row["model"], mode))
            if result.get("status") != "ok" or not speed:
                note = f"{result.get('status')}: {result.get('reason') or result.get('error') or ''}"
                rows.append(Row(section, name, math.nan, "img/s", note=note, command=command))
                continue
            other = row["attention"] != "none" and base_speed
            batch, peak = result.get("batch"), result.get("peak_memory_mib")
            slowest, fastest = result.get("step_ms_max"), result.get("step_ms_min")
            rows.append(Row(section, name, speed, "img/s", batch * 1e3 / slowest if batch and slowest else None,
                            batch * 1e3 / fastest if batch and fastest else None,
                            baseline=f"bare {row['model']}, {mode}" if other else None,
                            ratio=speed / base_speed if other else None, command=command,
                            note=f"batch {batch}, {row.get('precision')}"
                                 + (f", peak {peak:,.0f} MiB" if peak is not None else "")))  # fmt: skip
    checks = [(f"{r['model']} · {r['attention']} · {r['dtype']} · GPU vs CPU", r)
              for r in data.get("device_vs_cpu", [])]  # fmt: skip
    checks += [(f"{r['model']} · {r['attention']} · {r['precision']} · fused vs reference", r.get("equality", r))
               for r in data.get("fused", [])]  # fmt: skip
    for name, check in checks:
        worst = _worst(check["errors"]) if "errors" in check else math.nan
        if check.get("tolerance", 0) is None:  # bf16 fused paths: each error within 1.1× the reference's + 1e-3
            reference = check["reference_errors"]
            excess = [math.nan if reference[k] is None or check["errors"][k] is None
                      else check["errors"][k] - (1.1 * reference[k] + 1e-3) for k in reference]  # fmt: skip
            worst_excess = math.nan if any(math.isnan(e) for e in excess) else max(excess)  # nan: a failure
            rows.append(Row(section, f"{name} · worst excess over the reference's error", worst_excess, "",
                            target=("<=", 0.0), command=command,
                            note="each of output, input and parameter gradients against float64, minus 1.1× the "
                                 "reference formulation's error + 1e-3"))  # fmt: skip
            continue
        rows.append(Row(section, f"{name} · worst relative error", worst, "", target=("<=", check.get("tolerance", 0)),
                        note="max|a − b| / max|b| over outputs and gradients", command=command))  # fmt: skip
    for row in data.get("fused", []):
        if row.get("status") == "ok":
            fast, ref = row["train_step"]["fast"]["step_ms"], row["train_step"]["reference"]["step_ms"]
            speedup = row["attention_only_speedup"]
            rows.append(Row(section, f"{row['model']} · {row['attention']} · {row['precision']} · fused step", fast,
                            "ms", baseline="reference formulation", ratio=fast / ref, command=command,
                            note=f"attention alone: {speedup:.2f}× the reference's speed"))  # fmt: skip
    return rows


def run_all(scripts: list[Script], quick: bool, results: Path, out: Path) -> list[Row]:
    results.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for script in scripts:
        extra = script.quick_args if quick else []
        path = results / f"{script.name}.json"
        path.unlink(missing_ok=True)
        argv = [*script.args, *extra] + (["--json", str(path)] if script.json else [])
        command = shown([*script.args, *extra])
        print(f"\n=== {command}", flush=True)
        started = time.monotonic()
        status, tail = run_script(argv, results / f"{script.name}.log", script.timeout_s if quick else None)
        seconds = time.monotonic() - started
        try:
            if status != 0:
                raise RuntimeError("timed out" if status is None else f"exit status {status}")
            found = read_rows(path) if script.json else gpu_rows(script, results)
            for row in found:
                row.command = row.command or command
            rows += found
            outcome = "ok"
        except Exception as error:
            rows.append(failed_row(script.section, command, f"{error}\n{tail}"))
            outcome = f"**failed** ({error})"
        rows.append(Row(COMMANDS, command, seconds, "s", note=outcome))
        write_rows(results / "all.json", rows)
    write_text_atomic(out, render_markdown(rows, machine_info()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark at its quick size (< 10 minutes)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these benchmarks, by results name or section")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "BENCHMARKS.md")
    args = parser.parse_args()
    scripts = [s for s in SCRIPTS if not args.only or {s.name, s.section} & set(args.only)]
    started = time.monotonic()
    rows = run_all(scripts, args.quick, RESULTS, args.out)
    failed = sum(row.section == COMMANDS and row.note != "ok" for row in rows)
    print(f"\n{args.out}: {len(scripts) - failed} of {len(scripts)} benchmarks ran, "
          f"{(time.monotonic() - started) / 60:.1f} min")  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
