"""Time-series jobs end to end: ``san train`` on the embedded BasicMotions (built from sktime's files on first
use) with LSTM-4 + RAN, on a real local Ray, tracked in real MLflow (SQLite)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

SAN = str(Path(sys.executable).with_name("san"))


@pytest.mark.slow
def test_a_basic_motions_job_through_san_train_logs_accuracy_and_mae_per_epoch(tmp_path):
    spec = tmp_path / "motion.json"
    spec.write_text(json.dumps({
        "model": {"name": "lstm4", "attention": "ran", "placement": "full"},
        "data": {"dataset": "basic-motions"},
        "training": {"epochs": 3, "batch_size": 8},
        "validation": {"batch_size": 16},
        "lr": {"lr": 0.032, "schedule": "cosine"},
        "optimizer": {"name": "adamw", "label_smoothing": 0.0},
        "tracking": {"system_metrics_interval_s": 1},
    }))  # fmt: skip
    env = {**os.environ, "SAN_DATA_ROOT": str(tmp_path / "data"), "SAN_STORAGE_ROOT": str(tmp_path / "runs")}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([SAN, "train", str(spec)], capture_output=True, text=True, env=env, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    progress = [line for line in output.splitlines() if re.search(r"\bepoch \d/3  train/loss", line)]
    assert len(progress) == 3 and all(line.endswith("100 steps") for line in progress), progress
    found = re.search(r"MLflow run (\w+) at (\S+)", result.stdout)
    assert found, result.stdout
    client = MlflowClient(found.group(2))
    run = client.get_run(found.group(1))
    assert run.info.status == "FINISHED"
    assert run.data.params["data.dataset"] == "basic-motions" and run.data.params["model.attention"] == "ran"
    for metric in ("val/top1", "val/mae", "val/loss", "train/loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)) == [0, 1, 2], metric
    assert 0 <= run.data.metrics["val/top1"] <= 1 and 0 < run.data.metrics["val/mae"] < 0.5  # 4 classes: < 2/4
    # RAN's mask over features × time at the first recurrent layer, for the attention pictures
    maps = dict(np.load(client.download_artifacts(run.info.run_id, "attention/maps.npz", str(tmp_path / "maps"))))
    assert maps["mask"].shape == (4, 16, 100) and maps["image"].shape == (4, 100, 6)
    assert (tmp_path / "data" / "basic-motions" / "train.beton").is_file()  # built on first use
