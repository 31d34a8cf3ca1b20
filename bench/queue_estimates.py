"""How far the queue's estimates are from the truth, on a real local stack: a Ray head (2 CPUs), ``san serve`` with
one slot (``SAN_MAX_SUBMITTED=1``), a tiny Fashion-MNIST. One job first (the history), then 5 jobs queued at once:
every second each waiting job's view is read — its position must be its place in the order the jobs then start, and
its reason must count the jobs ahead — and each job's first estimated start and end are compared with when it was
submitted and when it ended. Also: a 3-worker job on the 2-CPU head is refused, saying so.

    .venv/bin/python bench/queue_estimates.py [--jobs 5] [--epochs 2]
"""

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_service import local_service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    spec = {
        "model": {"name": "lenet5", "attention": "none"},
        "training": {"epochs": args.epochs, "batch_size": 128},
        "lr": {"lr": 0.1, "schedule": "cosine"},
        "scaling": {"num_workers": 1},
    }
    with local_service("san-queue-bench-", 1024, timeout_s=60, ready_s=60, SAN_MAX_SUBMITTED="1") as api:
        too_big = api.post("/v1/jobs", json={**spec, "scaling": {"num_workers": 3}})
        print(f"3 workers on 2 CPUs: HTTP {too_big.status_code}: {too_big.json()['detail'][0]['msg']}")
        first = api.post("/v1/jobs", json=spec).json()["id"]
        wait_until_ended(api, [first])
        ids = [api.post("/v1/jobs", json=spec).json()["id"] for _ in range(args.jobs)]
        views: dict[str, list[dict]] = {job_id: [] for job_id in ids}
        while True:
            now = {job_id: {**api.get(f"/v1/jobs/{job_id}").json(), "read_at": datetime.now(UTC)} for job_id in ids}
            for job_id, view in now.items():
                views[job_id].append(view)
            if all(view["status"] in ("succeeded", "failed", "cancelled") for view in now.values()):
                break
            time.sleep(1)
        report(ids, views)
    return 0


def wait_until_ended(api: httpx.Client, ids: list[str]) -> None:
    while any(api.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed") for job_id in ids):
        time.sleep(1)


def at(view: dict, status: str) -> datetime | None:
    found = [t["at"] for t in view["transitions"] if t["status"] == status]
    return datetime.fromisoformat(found[-1]) if found else None


def report(ids: list[str], views: dict[str, list[dict]]) -> None:
    final = {job_id: views[job_id][-1] for job_id in ids}
    started = sorted(ids, key=lambda job_id: at(final[job_id], "submitted"))
    wrong = 0
    for step in range(max(len(v) for v in views.values())):
        waiting = [
            (job_id, views[job_id][step]["queue"])
            for job_id in ids
            if step < len(views[job_id]) and views[job_id][step]["status"] == "queued" and views[job_id][step]["queue"]
        ]
        order = [job_id for job_id in started if job_id in dict(waiting)]
        for job_id, queue in waiting:
            if queue["position"] is not None and queue["position"] != order.index(job_id) + 1:
                wrong += 1
    print(f"waiting views whose position was not their place in the start order: {wrong}")
    print("| job | first estimate | est. start | real start | est. end | real end | end error |")
    print("|---|---|---|---|---|---|---|")
    errors = []
    for job_id in started:
        estimate = next((v for v in views[job_id] if (v.get("queue") or {}).get("ends_at")), None)
        if estimate is None:
            print(f"| {job_id} | no estimate | | | | | |")
            continue
        made = estimate["read_at"]
        est_start = datetime.fromisoformat(estimate["queue"]["starts_at"])
        est_end = datetime.fromisoformat(estimate["queue"]["ends_at"])
        real_start, real_end = at(final[job_id], "submitted"), at(final[job_id], "succeeded")
        horizon = (real_end - made).total_seconds()
        error = (est_end - real_end).total_seconds()
        errors.append(abs(error) / horizon)
        print(
            f"| {job_id} | {estimate['queue']['estimate']} | {est_start:%H:%M:%S} | {real_start:%H:%M:%S} | "
            f"{est_end:%H:%M:%S} | {real_end:%H:%M:%S} | {error:+.0f} s ({100 * error / horizon:+.0f} % of "
            f"{horizon:.0f} s) |"
        )
    if errors:
        print(f"mean |end error| / time from queueing to the end: {100 * sum(errors) / len(errors):.0f} %")


if __name__ == "__main__":
    sys.exit(main())
