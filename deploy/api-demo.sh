#!/usr/bin/env bash
# The demo's last step: the same job as `san train`, through the REST API. Starts `san serve` in local mode (it
# starts its own Ray head with dashboard and stops it, by PID, on exit), with a one-off token, submits the spec
# with `san jobs submit --wait`, prints the per-epoch metrics the API reads from MLflow, and stops the service.
#   deploy/api-demo.sh SPEC [--workers N] [--epochs N]
set -euo pipefail
BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
PORT="${SAN_DEMO_PORT:-8000}"
export SAN_API_URL="http://127.0.0.1:${PORT}"
export SAN_API_TOKEN="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SAN_TOKENS="{\"demo\": \"$("$BIN/san" jobs hash-token "$SAN_API_TOKEN")\"}"
LOG="$(mktemp -t san-serve.XXXXXX.log)"
# The demo's spec asks 2 workers × 2 CPUs. `san train`'s local Ray admits that on a 2-core machine by advertising
# what the job needs (oversubscribed); the service's head must be told, or it refuses the job (422) — as it
# should on a real cluster. Set SAN_LOCAL_RAY_CPUS yourself to change it.
export SAN_LOCAL_RAY_CPUS="${SAN_LOCAL_RAY_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}"

"$BIN/san" serve --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "$SAN_API_URL/healthz" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "san serve exited; its log:"; cat "$LOG"; exit 1; }
  sleep 1
done
echo "service up at $SAN_API_URL (log: $LOG); readiness:"
curl -s "$SAN_API_URL/readyz"; echo
"$BIN/san" jobs submit "$@" --wait | tee "$LOG.submit"
JOB="$(head -1 "$LOG.submit" | cut -d' ' -f1)"
echo "per-epoch metrics of $JOB, as GET /v1/jobs/$JOB/metrics returns them:"
curl -s -H "Authorization: Bearer $SAN_API_TOKEN" "$SAN_API_URL/v1/jobs/$JOB/metrics" | "$BIN/python" -m json.tool
