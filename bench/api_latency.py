"""Latency of the job service's two hot endpoints over real HTTP: ``POST /v1/jobs`` (jobs stay queued: limit 0,
so this is validation + the durable insert) and ``GET /v1/jobs/{id}``, at 1, 10 and 50 concurrent clients
against ``san serve`` (uvicorn, one process, SQLite or PostgreSQL). Target: POST p99 < 50 ms at 50 clients (whether it
holds: results/BENCHMARKS.md).

    python bench/api_latency.py [--requests 400] [--repeats 3] [--database sqlite|postgresql] [--quick] [--json PATH]
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import Row, measured, parse_args, this_command, write_rows
from tests.services import TOKENS, Postgres, Service, free_port  # the tests' real-process helpers

SPEC = {"model": {"name": "lenet5", "attention": "san-c"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"peak_epoch": 1}}  # fmt: skip


async def measure(url: str, clients: int, requests: int, method: str, job_id: str | None) -> list[float]:
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    # aiohttp, not httpx: httpx's async pool costs more CPU per request than the server at 50 connections, and
    # the client shares this machine's 2 cores with the server.
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector) as client:
        remaining = 0

        async def one_client(record: bool) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                path = "/v1/jobs" if method == "POST" else f"/v1/jobs/{job_id}"
                async with client.request(method, path, json=SPEC if method == "POST" else None) as response:
                    await response.read()
                if record:
                    latencies.append(time.perf_counter() - started)
                if response.status not in (200, 201):
                    raise RuntimeError(f"{method}: HTTP {response.status}")

        for record, count in ((False, clients * 2), (True, requests)):  # first: open every connection, untimed
            remaining = count
            await asyncio.gather(*(one_client(record) for _ in range(clients)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per endpoint and concurrency level")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                        help="the job store: a SQLite file, or a PostgreSQL cluster on this machine (TCP)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every row; each figure is their median")
    args = parse_args(parser, quick={"requests": 300, "repeats": 2})
    postgres = Postgres() if args.database == "postgresql" else None
    with tempfile.TemporaryDirectory() as temp:
        settings = {"database_url": postgres.start()} if postgres else {}
        # thousands of POSTs by one principal: its share (SAN_MAX_JOBS_PER_PRINCIPAL) lifted, its check still made
        service = Service(
            Path(temp),
            max_submitted=0,
            ray_address=f"http://127.0.0.1:{free_port()}",
            max_jobs_per_principal=10**9,
            **settings,
        )
        service.start()
        try:
            with service.client() as client:
                job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
            asyncio.run(measure(service.url, 10, 100, "POST", None))  # warm-up: imports, caches
            rounds: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for _ in range(args.repeats):
                for clients in (1, 10, 50):
                    for method in ("POST", "GET"):
                        latencies = asyncio.run(measure(service.url, clients, args.requests, method, job_id))
                        rounds.setdefault((method, clients), []).append(
                            (percentile(latencies, 50), percentile(latencies, 99))
                        )
        finally:
            service.stop()
            if postgres:
                postgres.stop()
    store = "PostgreSQL on this machine" if postgres else "SQLite"
    print(f"\nsan serve (uvicorn, 1 process, {store}), {args.requests} requests per row, client on the same 2 cores, "
          f"median of {args.repeats} rounds\n")  # fmt: skip
    print("| request | clients | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for (method, clients), found in rounds.items():
        path = "/v1/jobs" if method == "POST" else "/v1/jobs/{id}"
        p50, p99 = (statistics.median(values) for values in zip(*found, strict=True))
        print(f"| {method} {path} | {clients} | {p50:.1f} | {p99:.1f} |")
    if args.json:
        write_rows(args.json, report_rows(rounds, "PostgreSQL" if postgres else "SQLite", args))


def report_rows(rounds: dict[tuple[str, int], list[tuple[float, float]]], store: str, args) -> list[Row]:
    """p99 per request and concurrency, p50 beside it: the median of the rounds, their min–max; the target on POST's
    p99 at 50 clients."""
    out, command = [], this_command()
    for (method, clients), found in rounds.items():
        path = "/v1/jobs" if method == "POST" else "/v1/jobs/{id}"
        p50 = [pair[0] for pair in found]
        note = f"p50 {statistics.median(p50):.1f} ms ({min(p50):.1f}–{max(p50):.1f})"
        if not out:
            note += f"; {args.requests} requests per round, the clients on the same machine"
        out.append(measured("api", f"{store} · {method} {path} · {clients} client{'s' * (clients > 1)} · p99",
                            [pair[1] for pair in found], "ms", target=("<", 50.0) if (method, clients) == ("POST", 50)
                            else None, note=note, command=command))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
