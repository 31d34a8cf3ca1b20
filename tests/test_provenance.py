"""What a results file says of where it came from: the command, the dates, the commit and the machine
(`training.provenance`, written by `san study run --out` as run.md and by `make bench` into BENCHMARKS.md)."""

import subprocess
from datetime import UTC, datetime

from san.cli import build_parser
from training.provenance import command_line, commit, header, machine


def test_the_header_names_the_command_the_dates_the_commit_and_the_machine():
    started = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
    text = header("san study run configs/studies/table6-motion.yaml --seeds 3", started, {"CPU": "a CPU", "cores": "2"})
    assert "`san study run configs/studies/table6-motion.yaml --seeds 3`" in text
    assert "2026-12-07 01:00–" in text and " UTC at commit `" in text
    assert "| CPU | a CPU |" in text and "| cores | 2 |" in text
    # a run names the commit it started at, not the one checked out when it wrote its results
    assert " UTC at commit `0123456789ab`, on:" in header("san study run x.yaml", started, {}, revision="0123456789ab")


def test_the_commit_is_this_checkouts_head_and_says_when_tracked_files_changed(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit().startswith(head)
    assert commit(tmp_path) == "unknown (not a git checkout)"


def test_the_command_is_shown_as_a_reader_types_it_and_the_machine_names_its_cores():
    assert command_line(["/x/.venv/bin/san", "study", "run", "a b.yaml"]) == "san study run 'a b.yaml'"
    assert {"CPU", "cores", "memory", "Python", "torch", "GPU"} <= set(machine())


def test_san_study_run_takes_out():
    args = build_parser().parse_args(["study", "run", "configs/studies/table6-motion.yaml", "--out", "results/x"])
    assert str(args.out) == "results/x" and args.seeds is None
