"""One benchmark report: every figure as a ``Row``, written by each benchmark as JSON (``--json PATH``) and
rendered by ``bench/run_all.py`` into BENCHMARKS.md beside the machine it was measured on."""

import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
from argparse import ArgumentParser, Namespace
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAILED = "failed"  # the unit of the row standing for a benchmark that did not finish
COMMANDS = "commands"  # the section of run_all's rows: one per command, its wall time
OPERATORS = {"<": "<", "<=": "≤", ">": ">", ">=": "≥"}


@dataclass
class Row:
    section: str  # "loader", "attention", "ray", "api", "end-to-end", ...
    name: str  # what was measured, e.g. "lenet5@28 b64 · cbam · bottleneck · step time"
    value: float  # median after warm-up
    unit: str  # "ms", "img/s", "MB", "×", ...
    low: float | None = None  # min over repeats
    high: float | None = None  # max over repeats
    baseline: str | None = None  # what the ratio is relative to, in words ("bare lenet5", "plain loop")
    ratio: float | None = None  # value / the baseline's value, or as the note says (a median of paired ratios)
    target: tuple[str, float] | None = None  # ("<=", 2.0) or (">=", 0.97): applied to ratio if set, else value
    note: str = ""  # e.g. "bounded by 2 cores", "FLOP ratio 4.23"
    command: str = ""  # the command that produced it


def measured(section: str, name: str, samples: list[float], unit: str, **fields) -> Row:
    """A row from repeated measurements: their median, min and max."""
    return Row(section, name, statistics.median(samples), unit, min(samples), max(samples), **fields)


def failed_row(section: str, command: str, error: str) -> Row:
    return Row(section, f"{command} failed", math.nan, FAILED, note=error, command=command)


def holds(row: Row) -> bool | None:
    if row.target is None:
        return None
    operator, bound = row.target
    figure = row.ratio if row.ratio is not None else row.value
    if math.isnan(figure):
        return False
    return {"<": figure < bound, "<=": figure <= bound, ">": figure > bound, ">=": figure >= bound}[operator]


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make BENCHMARKS.md private to whoever ran make bench
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_rows(path: Path, rows: list[Row]) -> None:
    write_text_atomic(Path(path), json.dumps([dataclasses.asdict(row) for row in rows], indent=1) + "\n")


def read_rows(path: Path) -> list[Row]:
    rows = []
    for fields in json.loads(Path(path).read_text()):
        if fields.get("target") is not None:
            fields["target"] = tuple(fields["target"])
        rows.append(Row(**fields))
    return rows


def report_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as report rows here")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: `make bench QUICK=1` (< 10 minutes)")


def parse_args(parser: ArgumentParser, quick: dict[str, object]) -> Namespace:
    """The command line with ``--json`` and ``--quick``; under ``--quick``, ``quick``'s defaults (an option
    given explicitly still wins)."""
    report_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args()
    return args


def this_command() -> str:
    """How this benchmark was run, as a reader would type it (without ``--json``, which only says where to)."""
    args, kept = sys.argv[1:], []
    while args:
        arg = args.pop(0)
        if arg == "--json":
            args = args[1:]
        elif not arg.startswith("--json="):
            kept.append(arg)
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join([".venv/bin/python", str(shown), *kept])


def machine_info() -> dict[str, str]:
    from training.provenance import machine  # one declaration of what a results file says of its machine

    return machine()


def number(value: float | None) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:#.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _target(row: Row) -> str:
    if row.target is None:
        return ""
    operator, bound = row.target
    unit = "×" if row.ratio is not None else f" {row.unit}".rstrip()
    return f"{OPERATORS.get(operator, operator)} {number(bound)}{unit}"


def _holds(row: Row) -> str:
    return {None: "", True: "✓ yes", False: "✗ **NO**"}[holds(row)]


def _table(rows: list[Row]) -> list[str]:
    lines = ["| measurement | median | min–max | ratio | baseline | target | holds | note |",
             "|---|---:|---:|---:|---|---|---|---|"]  # fmt: skip
    for row in rows:
        spread = f"{number(row.low)}–{number(row.high)}" if row.low is not None and row.high is not None else ""
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else ""
        cells = [row.name, f"{number(row.value)} {row.unit}".strip(), spread, ratio, row.baseline or "", _target(row),
                 _holds(row), row.note]  # fmt: skip
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines


def _failure(row: Row) -> list[str]:
    return [f"**FAILED**: `{row.command}`", "", "```", row.note.rstrip(), "```"]


def render_markdown(rows: list[Row], machine: dict[str, str]) -> str:
    from training.provenance import commit

    commands = [row for row in rows if row.section == COMMANDS]
    figures = [row for row in rows if row.section != COMMANDS]
    targeted = [row for row in figures if row.target is not None]
    failing = [row for row in targeted if not holds(row)]
    failed = [row for row in figures if row.unit == FAILED]
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (bench/run_all.py) on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit "
             f"`{commit()}`. Each figure "
             "is the median after warm-up, with the min–max over its repeats; a ratio is the figure over its "
             "baseline's (unless its note says otherwise, e.g. a median of ratios of neighbouring runs); a target "
             "applies to the ratio where there is one, else to the figure.", "",
             "## Machine", "", "| | |", "|---|---|"]  # fmt: skip
    lines += [f"| {key} | {_cell(value)} |" for key, value in machine.items()]
    lines += ["", "## Summary", "", f"{len(targeted) - len(failing)} of {len(targeted)} targets hold."]
    if failing:
        lines += ["", "Targets that do **not** hold:", ""]
        lines += [f"- ✗ {row.section}: {row.name} — {number(row.ratio if row.ratio is not None else row.value)}"
                  f"{'×' if row.ratio is not None else (' ' + row.unit).rstrip()}, target {_target(row)}"
                  + (f" ({row.note})" if row.note else "") for row in failing]  # fmt: skip
    if failed:
        lines += ["", "Benchmarks that failed:", ""] + [f"- ✗ {row.section}: `{row.command}`" for row in failed]
    if commands:
        lines += ["", "## Commands", "", "| command | wall time | result |", "|---|---:|---|"]
        lines += [f"| `{_cell(row.name)}` | {row.value:.0f} s | {row.note} |" for row in commands]
    for section in dict.fromkeys(row.section for row in figures):
        in_section = [row for row in figures if row.section == section]
        shown = [row for row in in_section if row.unit != FAILED]
        lines += ["", f"## {section}"]
        for command in dict.fromkeys(row.command for row in shown if row.command):
            lines += ["", f"`{command}`"]
        for row in in_section:
            if row.unit == FAILED:
                lines += ["", *_failure(row)]
        if shown:
            lines += ["", *_table(shown)]
    return "\n".join(lines) + "\n"
