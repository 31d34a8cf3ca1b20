"""bench/gpu.py on a machine without CUDA: the dry run exercises every part on CPU, the real run skips."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
ATTENTIONS = ["none", "cbam", "bam", "san-c", "san-d"]


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No GPU even where one exists: without --dry-run the script would otherwise start the full benchmark.
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    out = tmp_path_factory.mktemp("gpu")
    # From another directory: the script must find `san` by itself, as on a machine where it is not installed.
    result = run_script("--dry-run", "--out", str(out), cwd=out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md"]  # no temporary file left behind
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text(), result.stdout


@pytest.mark.slow
def test_dry_run_measures_every_attention_eager(dry_run: tuple[dict[str, Any], str, str]) -> None:
    data, _, _ = dry_run
    assert data["status"] == "complete" and data["dry_run"] is True
    assert {"torch", "cuda", "python", "date_utc", "device"} <= data["machine"].keys()
    assert [(row["model"], row["attention"]) for row in data["train"]] == [("resnet18", a) for a in ATTENTIONS]
    for row in data["train"]:
        eager = row["eager"]
        assert eager["status"] == "ok", eager
        assert eager["img_per_s"] > 0 and eager["step_ms"] > 0 and eager["batch"] == 2
        assert "peak_memory_mib" in eager  # None on CPU: CUDA's allocator is what it reads


@pytest.mark.slow
def test_dry_run_compiles_one_case_and_records_why_not_the_others(dry_run: tuple[dict[str, Any], str, str]) -> None:
    data, _, _ = dry_run
    compiled = {row["attention"]: row["compiled"] for row in data["train"]}
    assert compiled["san-d"]["status"] == "ok", compiled["san-d"]
    assert compiled["san-d"]["img_per_s"] > 0 and compiled["san-d"]["backend"] == "aot_eager"
    for attention in ("none", "cbam", "bam", "san-c"):
        assert compiled[attention]["status"] == "skipped" and "dry run" in compiled[attention]["reason"]


@pytest.mark.slow
def test_dry_run_equality_checks_pass(dry_run: tuple[dict[str, Any], str, str]) -> None:
    data, _, _ = dry_run
    assert [(row["attention"], row["dtype"]) for row in data["device_vs_cpu"]] == [
        ("san-c", "fp32"), ("san-c", "fp64"), ("san-d", "fp32"), ("san-d", "fp64"),
    ]  # fmt: skip
    for row in data["device_vs_cpu"]:
        assert row["status"] == "ok" and row["ok"], row
    fused = {(row["attention"], row["precision"]): row for row in data["fused"]}
    assert set(fused) == {(a, p) for a in ATTENTIONS[1:] for p in ("fp32", "bf16")}
    for key, row in fused.items():
        assert row["status"] == "ok", (key, row)
        assert row["equality"]["ok"], (key, row["equality"])
        assert row["attention_modules"] >= 1
        for mode in ("fast", "reference"):
            assert row["train_step"][mode]["img_per_s"] > 0
            assert row["attention_only_ms"][mode] > 0
        assert row["train_step_speedup"] > 0 and row["attention_only_speedup"] > 0


@pytest.mark.slow
def test_dry_run_markdown_has_every_table_and_attention(dry_run: tuple[dict[str, Any], str, str]) -> None:
    _, markdown, stdout = dry_run
    for heading in ("## Train step", "## SAN on cpu vs CPU", "## Fused path vs reference formulation"):
        assert heading in markdown
    for attention in ATTENTIONS:
        assert f"| resnet18 | {attention} |" in markdown
    for attention in ATTENTIONS[1:]:
        assert f"| {attention} | bf16 |" in markdown
    assert "**no**" not in markdown
    assert "done in" in stdout


def test_without_cuda_prints_the_reason_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = run_script("--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no CUDA device: ")
    assert not out.exists()
