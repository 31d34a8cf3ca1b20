"""The benchmark report: which rows hold their target, the rows' JSON, the machine, BENCHMARKS.md, and
bench/run_all.py carrying on past a benchmark that fails."""

import math
import textwrap

import pytest

from bench.report import COMMANDS, FAILED, Row, holds, machine_info, read_rows, render_markdown, write_rows
from bench.run_all import Script, gpu_json_rows, run_all


def table_line(markdown: str, name: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))


@pytest.mark.parametrize(
    ("value", "ratio", "target", "expected"),
    [
        (10.0, None, ("<", 50.0), True),
        (60.0, None, ("<", 50.0), False),
        (50.0, None, ("<", 50.0), False),
        (50.0, None, ("<=", 50.0), True),
        (5.0, 1.05, ("<=", 1.05), True),
        (5.0, 1.06, ("<=", 1.05), False),
        (900.0, 0.97, (">=", 0.97), True),
        (900.0, 0.96, (">=", 0.97), False),
        (0.5, 2.0, (">", 1.0), True),  # the ratio is judged, not the value
        (2.0, 0.5, (">", 1.0), False),
        (math.nan, None, ("<", 50.0), False),
        (1.0, None, None, None),
    ],
)
def test_holds_judges_the_ratio_when_there_is_one_else_the_value(value, ratio, target, expected):
    assert holds(Row("s", "x", value, "ms", ratio=ratio, target=target)) is expected


def test_a_row_whose_target_fails_is_marked_failing_and_one_that_holds_is_marked_holding():
    rows = [
        Row("ray", "1 Ray worker · epoch", 5.8, "s", 5.5, 6.1, "plain loop", 1.14, ("<=", 1.05), command="bench ray"),
        Row("api", "POST p99", 21.0, "ms", target=("<", 50.0), command="bench api"),
        Row("api", "GET p99", 44.0, "ms", command="bench api"),
    ]
    text = render_markdown(rows, {"CPU": "test CPU", "cores": "2"})
    failing, passing, untargeted = (table_line(text, name) for name in ("1 Ray worker · epoch", "POST p99", "GET p99"))
    assert "✗" in failing and "NO" in failing and "≤ 1.05×" in failing and "5.50–6.10" in failing
    assert "✓ yes" in passing and "✗" not in passing and "< 50.00 ms" in passing
    assert "✓" not in untargeted and "✗" not in untargeted
    assert "1 of 2 targets hold" in text
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert "1 Ray worker · epoch" in summary and "POST p99" not in summary
    assert "| CPU | test CPU |" in text and "`bench ray`" in text and "`bench api`" in text


def test_rows_round_trip_through_json(tmp_path):
    rows = [
        Row(
            "loader",
            "64 px · FFCV vs PIL",
            36283.0,
            "img/s",
            35000.0,
            37000.0,
            "PIL DataLoader",
            5.03,
            (">=", 1.0),
            "4,000 images",
            "python bench/loader.py",
        ),
        Row("api", "POST p99", 21.0, "ms"),
    ]
    path = tmp_path / "rows.json"
    write_rows(path, rows)
    write_rows(path, rows[1:])  # overwrites, never appends
    assert read_rows(path) == rows[1:]
    write_rows(path, rows)
    assert read_rows(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # no temp file left behind


def test_machine_info_names_the_cores_and_the_memory():
    machine = machine_info()
    assert machine["cores"][0].isdigit() and machine["memory"].endswith("GiB")
    assert {"CPU", "OS", "Python", "torch", "ray", "ffcv", "mlflow", "GPU"} <= set(machine)


def fake_script(path, body: str) -> str:
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_run_all_marks_a_failing_benchmark_failed_and_runs_the_others(tmp_path):
    writes = """\
        import json, sys
        row = {"section": "fast", "name": "a fast thing", "value": 2.0, "unit": "ms", "target": ["<", 1.0]}
        json.dump([row], open(sys.argv[sys.argv.index("--json") + 1], "w"))
    """
    scripts = [
        Script("broken", "broken", [fake_script(tmp_path / "broken.py", "raise SystemExit('boom: it broke')\n")]),
        Script("silent", "silent", [fake_script(tmp_path / "silent.py", "print('no rows written')\n")]),
        Script("hung", "hung", [fake_script(tmp_path / "hung.py", "import time\ntime.sleep(60)\n")], timeout_s=1),
        Script("fast", "fast", [fake_script(tmp_path / "fast.py", writes)]),
    ]
    out = tmp_path / "BENCHMARKS.md"
    rows = run_all(scripts, quick=True, results=tmp_path / "results", out=out)
    failed = {row.section: row for row in rows if row.unit == FAILED}
    assert set(failed) == {"broken", "silent", "hung"}
    assert "boom: it broke" in failed["broken"].note and "exit status 1" in failed["broken"].note
    assert "timed out" in failed["hung"].note
    assert [row.name for row in rows if row.section == "fast"] == ["a fast thing"]
    assert len([row for row in rows if row.section == COMMANDS]) == 4
    text = out.read_text()
    assert text.count("**FAILED**") == 3 and "boom: it broke" in text
    assert "✗" in table_line(text, "a fast thing") and "0 of 1 targets hold" in text
    kept = read_rows(tmp_path / "results" / "all.json")
    assert [(row.section, row.name, row.note) for row in kept] == [(row.section, row.name, row.note) for row in rows]


def test_a_gpu_run_becomes_rows_and_a_check_beyond_its_tolerance_fails():
    step = {"status": "ok", "batch": 256, "step_ms_min": 100.0, "step_ms_max": 125.0, "peak_memory_mib": 900.0}
    data = {
        "dry_run": False, "status": "complete", "elapsed_s": 400.0, "machine": {"gpu": "NVIDIA H200"},
        "train": [
            {"model": "resnet18", "attention": "none", "size": 176, "precision": "bf16",
             "eager": {**step, "img_per_s": 2400.0}, "compiled": {"status": "skipped", "reason": "budget"}},
            {"model": "resnet18", "attention": "san-c", "size": 176, "precision": "bf16",
             "eager": {**step, "img_per_s": 1200.0}, "compiled": {"status": "skipped", "reason": "budget"}},
        ],
        "device_vs_cpu": [{"model": "resnet18", "attention": "san-c", "dtype": "fp32", "status": "ok",
                           "errors": {"output": 1e-6, "input_grad": 2e-3, "param_grad": None}, "tolerance": 1e-4}],
        "fused": [],
    }  # fmt: skip
    rows = {row.name: row for row in gpu_json_rows(data, "gpu", "bench/gpu.py")}
    san = rows["resnet18@176 · san-c · eager · train step"]
    assert (san.value, san.ratio, san.low, san.high) == (1200.0, 0.5, 2048.0, 2560.0)
    assert math.isnan(rows["resnet18@176 · none · compiled · train step"].value)
    assert holds(rows["resnet18 · san-c · fp32 · GPU vs CPU · worst relative error"]) is False


def test_a_bf16_fused_check_is_held_to_the_reference_formulations_error_against_float64():
    def fused(errors: dict, reference_errors: dict) -> dict:
        return {"model": "resnet18", "attention": "bam", "precision": "bf16", "status": "failed",
                "equality": {"errors": errors, "reference_errors": reference_errors, "tolerance": None}}  # fmt: skip

    reference = {"output": 0.001, "input_grad": 0.07, "param_grad": 0.5}
    cases = [({**reference, "param_grad": 0.4}, True), ({**reference, "param_grad": 0.6}, False),
             ({**reference, "output": 0.02}, False), ({**reference, "output": None}, False)]  # fmt: skip
    for errors, expected in cases:  # each kind against its own reference error, not the worst of them
        data = {"dry_run": False, "machine": {}, "train": [], "device_vs_cpu": [], "fused": [fused(errors, reference)]}
        (row,) = gpu_json_rows(data, "gpu", "bench/gpu.py")[1:]
        assert row.target == ("<=", 0.0) and holds(row) is expected, (errors, row.value)


@pytest.mark.parametrize(
    ("step_seconds", "expected"),
    [(0.005, 15), (2.0, 15), (5.0, 6), (30.0, 3), (100.0, 3), (0.0, 15)],
)
def test_the_attention_bench_times_slow_steps_fewer_times_but_at_least_three(step_seconds, expected):
    from bench.attention_overhead import timed_steps

    assert timed_steps(step_seconds, repeats=15, budget_s=30.0) == expected
