"""Reads stay cheap whatever the store holds (issue 24): ``GET /v1/studies?limit=300`` with 300 studies and
``GET /v1/jobs?limit=50`` with 10,000 jobs, over real HTTP against ``san serve`` (uvicorn, one process, SQLite),
one client. Targets: p99 < 200 ms and < 50 ms. The store is filled directly (the rows a service writes) before the
service starts; no job leaves the queue.

    python bench/api_reads.py [--requests 200] [--studies 300] [--jobs 10000] [--quick] [--json PATH]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import Row, measured, parse_args, this_command, write_rows
from service.store import JobStore, StudyStore, new_job
from tests.services import TOKENS, Service, free_port

SPEC = {
    "model": {"name": "lenet5", "attention": "san-c"},
    "training": {"epochs": 2, "batch_size": 32},
    "lr": {"peak_epoch": 1},
    "data": {"dataset": "fashion-mnist"},
    "tracking": {"mlflow_uri": None},
}
STUDY = {
    "name": "table4",
    "base": SPEC,
    "seeds": [0, 1, 2],
    "axes": {"model.attention": ["none", "cbam", "bam", "san-c", "san-d"]},
}
CHILDREN = [(f"c{cell:03d}", seed, SPEC) for cell in range(5) for seed in range(3)]  # Table IV: 5 cells × 3 seeds


def fill(database: Path, studies: int, jobs: int) -> None:
    store = JobStore(f"sqlite:///{database}")
    try:
        study_store = StudyStore(store)
        for index in range(studies):
            study_store.create(
                "alice",
                f"study-{index:016x}",
                STUDY,
                None,
                f"run-{index}",
                CHILDREN,
                {"cells": 5, "refused": 0, "merged": 0},
            )
        loose = max(0, jobs - studies * len(CHILDREN))
        for start in range(0, loose, 1000):
            store.add([new_job("alice", SPEC) for _ in range(min(1000, loose - start))])
    finally:
        store.close()


def timed(client: httpx.Client, path: str, requests: int) -> list[float]:
    for _ in range(5):  # warm-up
        client.get(path).raise_for_status()
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path)
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=10_000, help="in all, the studies' children included")
    args = parse_args(parser, quick={"requests": 60})
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        fill(root / "runs" / "service.db", args.studies, args.jobs)
        service = Service(root, max_submitted=0, ray_address=f"http://127.0.0.1:{free_port()}").start()
        try:
            headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
            with httpx.Client(base_url=service.url, headers=headers, timeout=60) as client:
                found = client.get("/v1/studies", params={"limit": 300}).json()
                assert found["total"] == args.studies and len(found["items"]) == min(300, args.studies), found["total"]
                assert client.get("/v1/jobs", params={"limit": 1}).json()["total"] >= args.jobs
                results = {
                    "studies": timed(client, "/v1/studies?limit=300", args.requests),
                    "jobs": timed(client, "/v1/jobs?limit=50", args.requests),
                }
        finally:
            service.stop()
    targets = {"studies": 200.0, "jobs": 50.0}
    print(
        f"\nsan serve (uvicorn, 1 process, SQLite), {args.studies} studies of 15 jobs, {args.jobs:,} jobs in all, "
        f"{args.requests} sequential requests each\n"
    )
    print("| request | p50 ms | p99 ms | target p99 |")
    print("|---|---:|---:|---:|")
    for name, path in (("studies", "GET /v1/studies?limit=300"), ("jobs", "GET /v1/jobs?limit=50")):
        p50, p99 = percentile(results[name], 50), percentile(results[name], 99)
        print(f"| {path} | {p50:.1f} | {p99:.1f} | < {targets[name]:g} |")
    if args.json:
        write_rows(args.json, report_rows(results, targets, args))


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report_rows(results: dict[str, list[float]], targets: dict[str, float], args) -> list[Row]:
    command = this_command()
    scale = {"studies": f"{args.studies} studies", "jobs": f"{args.jobs:,} jobs"}
    paths = {"studies": "GET /v1/studies?limit=300", "jobs": "GET /v1/jobs?limit=50"}
    return [
        measured(
            "api",
            f"SQLite · {paths[name]} at {scale[name]} · p99",
            [percentile(values, 99)],
            "ms",
            target=("<", targets[name]),
            note=f"p50 {percentile(values, 50):.1f} ms; {len(values)} requests, one client on the same machine",
            command=command,
        )
        for name, values in results.items()
    ]


if __name__ == "__main__":
    main()
