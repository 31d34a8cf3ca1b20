#!/usr/bin/env bash
# The image's entrypoint (under tini): one image, every role by its first argument.
#   api         the job service (FastAPI on uvicorn) on :8000
#   ray-head    a Ray head with the dashboard (Jobs API) on :8265, GCS on :6379
#   ray-worker  a Ray node joining RAY_HEAD_ADDRESS (default ray-head:6379)
#   mlflow      the tracking server on :5000 (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION)
#   anything else runs as given: `san train …`, `bash`, …
# Arguments after a role are appended to its command. RAY_NUM_CPUS / RAY_NUM_GPUS, when set, size a Ray node.
# The role is written to SAN_ROLE_FILE (/tmp/san-role) for docker/healthcheck.sh.
set -euo pipefail

role="${1:-api}"
[ "$#" -gt 0 ] && shift

case "$role" in
    api | ray-head | ray-worker | mlflow) recorded="$role" ;;
    *) recorded=other ;;
esac
echo "$recorded" > "${SAN_ROLE_FILE:-/tmp/san-role}" 2>/dev/null \
    || echo "entrypoint: cannot write ${SAN_ROLE_FILE:-/tmp/san-role}; the health check will say healthy" >&2

ray_resources=()
[ -n "${RAY_NUM_CPUS:-}" ] && ray_resources+=("--num-cpus=$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && ray_resources+=("--num-gpus=$RAY_NUM_GPUS")

need() {
    [ -n "${!1:-}" ] || { echo "entrypoint: role $role needs $1" >&2; exit 2; }
}

case "$role" in
    api)
        exec san serve --host 0.0.0.0 --port 8000 "$@"
        ;;
    ray-head)
        exec ray start --head --block --port=6379 --include-dashboard=true --dashboard-host=0.0.0.0 \
            --dashboard-port=8265 --disable-usage-stats "${ray_resources[@]}" "$@"
        ;;
    ray-worker)
        exec ray start --block --address="${RAY_HEAD_ADDRESS:-ray-head:6379}" --disable-usage-stats \
            "${ray_resources[@]}" "$@"
        ;;
    mlflow)
        need MLFLOW_BACKEND_STORE_URI
        need MLFLOW_ARTIFACTS_DESTINATION
        exec mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
            --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
