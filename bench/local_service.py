"""The real local stack the service benchmarks run against (bench/queue_estimates.py, bench/plan_estimate.py): a
Fashion-MNIST subset, a Ray head with 2 CPUs, ``san serve`` on it with a SQLite MLflow store, and a client holding
the bench's token — everything under a fresh temporary folder, stopped on the way out."""

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.auth import hash_token
from service.local_ray import LocalRayHead, free_ports
from training.data.build import build_dataset
from training.data.writer import WriterOptions

BIN = Path(sys.executable).parent
TOKEN = "bench-token"


@contextmanager
def local_service(
    prefix: str, images: int, timeout_s: float, ready_s: float, **settings: str
) -> Iterator[httpx.Client]:
    """A client of ``san serve`` (requests time out after ``timeout_s``) on a fresh local stack, once it answers
    ``/healthz`` or ``ready_s`` passed; ``images`` of Fashion-MNIST in each split, ``settings`` more of the service's
    environment (e.g. ``SAN_MAX_SUBMITTED="1"``)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    build_dataset("fashion-mnist", None, root / "data" / "fashion-mnist", WriterOptions(num_workers=2, subset=images))
    ray_port, dashboard, api_port = free_ports(3)
    head = LocalRayHead(ray_port, dashboard, num_cpus=2)
    head.start()
    env = {
        **os.environ,
        "SAN_RAY_ADDRESS": head.address,
        "SAN_RAY_AUTH_TOKEN": head.token,
        "SAN_POLL_INTERVAL_S": "0.5",
        "SAN_STORAGE_ROOT": str(root / "runs"),
        "SAN_DATA_ROOT": str(root / "data"),
        "SAN_MLFLOW_URI": f"sqlite:///{root / 'mlflow.db'}",
        "SAN_TOKENS": json.dumps({"bench": hash_token(TOKEN)}),
        **settings,
    }
    with open(root / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "san"), "serve", "--port", str(api_port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout_s
    )
    try:
        for _ in range(int(ready_s / 0.5)):
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield api
    finally:
        server.terminate()
        server.wait(30)
        head.stop()
