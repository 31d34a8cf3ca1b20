"""``make demo`` as a newcomer runs it, on a tiny budget: the Table IV study through the API (its own Ray head,
mlflow server and service, all stopped afterwards), the table printed beside the paper's figures."""

import os
import re
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.services import free_port
from training.data.build import build_dataset
from training.data.writer import WriterOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200, method="thread")]
ROOT = Path(__file__).resolve().parent.parent
PAPER = {"Base Model": ("89.43", "99.87"), "CBAM": ("89.27", "99.85"), "BAM": ("89.64", "99.90"),
         "SAN-c": ("89.75", "99.92"), "SAN-d": ("89.94", "99.96")}  # fmt: skip


def test_make_demo_prints_table_iv_beside_the_papers_figures_and_stops_what_it_started(tmp_path):
    # A small Fashion-MNIST where the demo looks for the embedded one: the demo builds it only when it is missing.
    build_dataset("fashion-mnist", None, tmp_path / "data" / "fashion-mnist", WriterOptions(num_workers=2, subset=640))
    env = {**os.environ, "SAN_DATA_ROOT": str(tmp_path / "data"), "SAN_STORAGE_ROOT": str(tmp_path / "runs"),
           "SAN_DEMO_PORT": str(free_port()), "SAN_DEMO_MLFLOW_PORT": str(free_port()),
           "SAN_LOCAL_RAY_PORT": str(free_port()), "SAN_LOCAL_RAY_DASHBOARD_PORT": str(free_port())}  # fmt: skip
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(["make", "-s", "demo", "SEEDS=1", "EPOCHS=1"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1100)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert '"count": 640' in out  # the demo trained on the slice it found, not a new build
    assert re.search(r"cells: 5 done\s+\(children: 5 succeeded\)", out), out[-3000:]
    row = re.compile(r"^\| (Base Model|CBAM|BAM|SAN-c|SAN-d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", re.M)
    rows = {match[1]: match.groups()[1:] for match in row.finditer(out)}
    assert set(rows) == set(PAPER)
    for module, (top1, top5, paper1, paper5) in rows.items():
        assert (paper1, paper5) == PAPER[module]
        assert 0 < float(top1) <= float(top5) <= 100
    study = re.search(r"tables and figures: (\S+)/", out)[1]
    figures = sorted(p.name for p in (Path(study) / "figures").glob("*.png"))
    assert figures == ["epoch_seconds.png", "fig4_scale_space.png", "fig8_masks.png", "val_top1.png"]
    link = r"MLflow UI \(while the demo runs\): http://127.0.0.1:\d+/#/experiments/\d+\?workflowType=machine_learning"
    assert re.search(link, out), out[-1000:]
    left = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid not in before and started_here(p, env)]
    assert not left, [" ".join(p.info["cmdline"] or []) for p in left]


def started_here(process: psutil.Process, env: dict[str, str]) -> bool:
    """Whether ``process`` belongs to the demo: it (and every Ray process its head spawned) inherited its storage
    root. Other Ray clusters on the machine are not the demo's to stop."""
    try:
        return process.environ().get("SAN_STORAGE_ROOT") == env["SAN_STORAGE_ROOT"]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
