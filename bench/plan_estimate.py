"""How close a study's plan comes to the real run, on a real local stack: a Ray head (2 CPUs), ``san serve``, a
Fashion-MNIST subset. The paper's Table IV preset (``configs/studies/table4-fmnist.yaml``) runs once for the history;
then ``POST /v1/studies/plan`` of the same preset on other seeds gives its job count and estimated wall time, and the
study is submitted and timed from its submission to its end.

    .venv/bin/python bench/plan_estimate.py [--epochs 3] [--images 8192]
"""

import argparse
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_service import local_service
from training.study import load_study

PRESET = Path(__file__).resolve().parent.parent / "configs" / "studies" / "table4-fmnist.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=8192, help="Fashion-MNIST images in each split (a subset)")
    args = parser.parse_args()
    with local_service("san-plan-bench-", args.images, timeout_s=120, ready_s=120) as api:
        first = load_study(PRESET, 1, args.epochs).model_dump(mode="json")
        history_s = run(api, first)
        print(f"history: {PRESET.name}, seed 0, {args.epochs} epochs on {args.images:,} images: {history_s:.0f} s")
        second = {**first, "seeds": [1]}
        plan = api.post("/v1/studies/plan", json=second)
        plan.raise_for_status()
        plan = plan.json()
        real_s = run(api, second)
        print(
            f"plan: {plan['jobs']} jobs ({plan['merged']} cells merged, {plan['refused']} refused), "
            f"{plan['estimated_jobs']} estimated; {plan['estimate']}"
        )
        if plan["wall_s"] is None:
            print(f"real run (seed 1): {real_s:.0f} s; the plan gave no estimate")
            return 1
        error = plan["wall_s"] - real_s
        print(
            f"| study | jobs | plan's wall time | real wall time | error |\n|---|---|---|---|---|\n"
            f"| {PRESET.stem} (seed 1, {args.epochs} epochs) | {plan['jobs']} | {plan['wall_s']:.0f} s | "
            f"{real_s:.0f} s | {error:+.0f} s ({100 * error / real_s:+.0f} %) |"
        )
    return 0


def run(api: httpx.Client, study: dict) -> float:
    """Seconds from the study's submission until it ended (every child), failing loudly if a child failed."""
    started = time.monotonic()
    response = api.post("/v1/studies", json=study)
    response.raise_for_status()
    study_id = response.json()["id"]
    while (view := api.get(f"/v1/studies/{study_id}", params={"table": "false"}).json())["status"] == "running":
        time.sleep(1)
    if view["status"] != "succeeded":
        raise RuntimeError(f"study {study_id} ended {view['status']}: {view}")
    return time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())
