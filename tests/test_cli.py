"""The ``san`` console script, run as a user runs it."""

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

import san
from service.auth import hash_token
from tests.slices import SLICE_PATHS, build_fmnist_slices
from training.driver_report import read_report

SAN = str(Path(sys.executable).with_name("san"))


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SAN, *args], capture_output=True, text=True, timeout=120, input=stdin, env=env)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"san {san.__version__}"


def test_models_lists_the_registry():
    result = run("models")
    expected = ["lenet5", "lstm4", "resnet18", "resnet50", "vgg16", "vgg16_bn", "vgg16_c", "vgg19", "vgg19_bn"]
    assert result.returncode == 0 and result.stdout.split() == expected


def test_models_table_gives_params_attention_params_modules_and_flops():
    result = run("models", "--table", "--models", "lenet5", "--input-size", "28", "--num-classes", "10")
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| lenet5")]
    cells = {(r[1].strip(), r[2].strip()): [c.strip() for c in r[3:]] for r in rows}
    assert len(rows) == 1 + 5 * 3
    assert cells[("none", "-")][:3] == ["61,706", "0", "0"]
    assert cells[("ran", "full")] == ["-"] * 4  # RAN works on sequences only
    # SAN's smoothing convs at LeNet's two positions: 6->6 and 16->16, 5x5, with bias.
    assert cells[("san-c", "bottleneck")][:3] == ["69,028", f"{6 * 6 * 25 + 6 + 16 * 16 * 25 + 16:,}", "2"]
    assert cells[("bam", "reference")][2] == "1"


def test_models_table_of_lstm4_counts_its_recurrent_layers_and_sequence_modules():
    result = run("models", "--table", "--models", "lstm4", "--input-size", "100", "--num-classes", "4")
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| lstm4")]
    cells = {(r[1].strip(), r[2].strip()): [c.strip() for c in r[3:]] for r in rows}
    lstm = [4 * 64 * (features + 64) + 2 * 4 * 64 for features in (1, 64, 64, 64)]  # weights and both biases
    assert cells[("none", "-")][:3] == [f"{sum(lstm) + 64 * 4 + 4:,}", "0", "0"]
    smoothing = 64 * 64 * 3 + 64  # SAN's Conv1d(64, 64, 3) after a recurrent layer
    assert cells[("san-c", "full")][1:3] == [f"{4 * smoothing:,}", "4"]
    assert cells[("san-d", "bottleneck")][1:3] == [f"{2 * smoothing:,}", "2"]
    assert cells[("ran", "full")][1:3] == [f"{4 * (64 * 64 * 2 + 64):,}", "4"]  # W_x with its bias, W_s
    assert cells[("cbam", "full")] == ["-"] * 4
    # a CNN option in a table of every model is for the CNNs: the recurrent model's rows stay
    mixed = run("models", "--table", "--models", "lstm4,resnet18", "--stem", "small", "--attention", "none",
                "--num-classes", "4")  # fmt: skip
    assert mixed.returncode == 0 and "| lstm4 | none | - | 117,252 |" in mixed.stdout, mixed.stderr


def test_bad_model_name_is_one_line_and_exit_2():
    result = run("models", "--table", "--models", "resnet34")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown model ['resnet34']" in result.stderr


BAD_SPECS = [  # (file name, text or None for no file, how its one-line error starts; {path}: the file's path)
    ("bad.yaml", "model: {name: lenet9}\n", "error: model.name: Value error, unknown model 'lenet9'"),
    ("missing.yaml", None, "error: {path}: no such spec file"),
    ("broken.yaml", "model:\n  name: lenet5\n data: [\n", "error: {path}: not valid YAML at line 3, column 2: "),
    ("broken.json", '{"model": ', "error: {path}: not valid JSON at line 1, column 11: Expecting value"),
    ("list.yaml", "- model\n", "error: spec: Input should be a valid dictionary"),
    ("nan.yaml", "lr: {lr: .nan}\n", "error: lr.lr: "),
    ("inf.json", '{"lr": {"lr": 1e999}}', "error: lr.lr: "),
    (
        "kwargs.yaml",
        "model: {attention: cbam, attention_kwargs: {reduction: 0}}\n",
        "error: model.attention_kwargs.reduction: ",
    ),
    ("run-name.yaml", 'tracking: {run_name: "../a\\0"}\n', "error: tracking.run_name: "),
]


def test_train_refuses_a_bad_spec_in_one_line_before_ray(tmp_path, monkeypatch, capsys):
    """Each bad spec through `san train`'s own entry (san.cli.main, in process: a process each would cost ~3 s of
    imports) and, once, through the installed console script with a bare environment: exit 2, one line on stderr
    naming the problem, nothing on stdout, and nothing written — no MLflow store, no Ray storage, no Ray."""
    import ray

    from san.cli import main

    runs = tmp_path / "runs"
    monkeypatch.setenv("SAN_STORAGE_ROOT", str(runs))
    monkeypatch.setenv("SAN_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cases = [((str(tmp_path / name),), start.format(path=tmp_path / name)) for name, _, start in BAD_SPECS]
    cases.append((("configs/lenet5-fmnist.yaml", "--epochs", "0"), "error: training.epochs: Input should be greater"))
    for name, content, _ in BAD_SPECS:
        if content is not None:
            (tmp_path / name).write_text(content)
    for args, start in cases:
        assert main(["train", *args]) == 2, args
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith(start) and "Traceback" not in err, (args, err)
    assert not runs.exists() and not ray.is_initialized()
    bare = {"PATH": str(Path(SAN).parent), "HOME": str(tmp_path), "SAN_STORAGE_ROOT": str(runs)}
    result = run("train", str(tmp_path / "bad.yaml"), env=bare)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(BAD_SPECS[0][2]) and "Traceback" not in result.stderr, result.stderr
    assert not runs.exists()


def test_the_job_entrypoint_reports_why_it_failed_where_the_service_reads_it(tmp_path):
    """Ray Jobs' message is the tail of the driver's log; the service reads the driver's report instead: here both
    jobs fail before their MLflow run exists, so the report holds the reason and no run id."""
    spec = {"model": {"name": "lenet5"}, "data": {"train_path": "nowhere/train.beton", "val_path": "nowhere/val.beton"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"name": "lenet9"}}))
    env = {**os.environ, "SAN_DATA_ROOT": str(tmp_path / "data"), "SAN_STORAGE_ROOT": str(tmp_path / "runs")}
    cases = [("spec.json", 1, "ValueError: data.train_path: "), ("bad.json", 2, "unknown model 'lenet9'")]
    for name, code, reason in cases:
        report_file = tmp_path / f"{name}.report.json"
        command = [sys.executable, "-m", "training.run", str(tmp_path / name), "--report-file", str(report_file)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == code, result.stderr
        report = read_report(report_file)
        assert report is not None and reason in report.error and report.mlflow_run_id is None, report
    assert "does not exist" in read_report(tmp_path / "spec.json.report.json").error
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written by rename, no temp left
    assert not (tmp_path / "runs" / "ray").exists()  # nothing written for workers that never started


@pytest.mark.slow
def test_train_runs_a_job_on_a_local_ray_with_one_progress_line_per_epoch(tmp_path):
    data = tmp_path / "data"
    build_fmnist_slices(data, train=256, val=128)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "model: {name: lenet5, attention: san-c}\n"
        f"data: {json.dumps(SLICE_PATHS)}\n"  # JSON is YAML
        "training: {epochs: 2, batch_size: 32}\n"
        "validation: {batch_size: 64}\n"
    )
    env = {**os.environ, "SAN_DATA_ROOT": str(data), "SAN_STORAGE_ROOT": str(tmp_path / "runs")}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([SAN, "train", str(spec), "--workers", "2"], capture_output=True, text=True, env=env,
                            timeout=400)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    progress = [line for line in output.splitlines() if re.search(r"\bepoch \d/2  train/loss", line)]
    assert [re.search(r"epoch (\d)/2", line).group(1) for line in progress] == ["1", "2"], progress
    # the local Ray has its dashboard, so Ray Train's placement-group cleaner can see the controller
    assert "Failed to query Ray Train Controller" not in output
    assert re.search(r": 2 epochs, val/top1 0\.\d+", result.stdout), result.stdout
    # the workers read the spec from one file the driver wrote in the run's directory: the override applied
    [written] = (tmp_path / "runs" / "ray").glob("*/spec.json")
    assert json.loads(written.read_text())["scaling"]["num_workers"] == 2


def test_hash_token_reads_the_token_from_stdin_and_prints_what_the_service_compares():
    token = "alice-secret-token"
    for given in (token, f"  {token}  \nsecond line ignored\n"):
        result = run("jobs", "hash-token", stdin=given)
        assert result.returncode == 0 and result.stdout == hash_token(token) + "\n", result.stderr
    for empty in ("", "   \n"):
        result = run("jobs", "hash-token", stdin=empty)
        assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
        assert result.stderr.startswith("san jobs hash-token: error: no token on stdin"), result.stderr


def test_a_token_on_the_command_line_is_refused_with_exit_2_without_repeating_it():
    secret = "secret-on-argv"
    cases = [
        ("jobs", "hash-token", secret),
        ("jobs", f"--token={secret}", "list"),
        ("jobs", "list", "--token", secret),
        ("study", "--token", secret, "list"),
    ]
    for args in cases:
        result = run(*args, stdin=secret)
        assert result.returncode == 2 and result.stdout == "", (args, result.stdout)
        assert result.stderr.count("\n") == 1 and secret not in result.stderr, (args, result.stderr)
        assert "`ps`" in result.stderr, result.stderr


class Recorder(BaseHTTPRequestHandler):
    """Answers every GET with an empty page of jobs, keeping each request's Authorization header."""

    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        Recorder.seen.append(self.headers.get("Authorization"))
        body = b'{"items": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_the_client_takes_its_token_from_san_api_token_or_a_token_file(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        env = {**os.environ, "SAN_API_URL": url, "SAN_API_TOKEN": "from-the-environment"}
        token_file = tmp_path / "token"
        token_file.write_text("from-the-file\n")
        (tmp_path / "empty").write_text("\n")
        Recorder.seen.clear()
        assert run("jobs", "list", env=env).returncode == 0
        assert run("jobs", "--token-file", str(token_file), "list", env=env).returncode == 0  # the file wins
        assert run("study", "--token-file", str(token_file), "list", env=env).returncode == 0
        assert Recorder.seen == ["Bearer from-the-environment", "Bearer from-the-file", "Bearer from-the-file"]
        for bad, reason in ((tmp_path / "missing", "No such file or directory"), (tmp_path / "empty", "is empty")):
            result = run("jobs", "--token-file", str(bad), "list", env=env)
            assert result.returncode == 2 and result.stderr.count("\n") == 1 and reason in result.stderr
        assert len(Recorder.seen) == 3  # neither bad file made a request
    finally:
        server.shutdown()
        server.server_close()
