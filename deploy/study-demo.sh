#!/usr/bin/env bash
# `make demo`'s main step: the paper's Table IV as one study through the REST API. Starts an `mlflow server` (on the
# same SQLite store `san train` uses) and `san serve` in local mode (its own Ray head with dashboard), with a one-off
# token; submits the study with `san study submit --wait` (a line per change of progress, then the table beside the
# paper's figures); prints where the figures are and how to browse the runs; stops exactly what it started.
#   deploy/study-demo.sh STUDY [--seeds N] [--epochs N]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.venv/bin"
PORT="${SAN_DEMO_PORT:-8000}"
MLFLOW_PORT="${SAN_DEMO_MLFLOW_PORT:-5000}"
STORAGE="$(realpath -m "${SAN_STORAGE_ROOT:-runs}")"
mkdir -p "$STORAGE"
export SAN_API_URL="http://127.0.0.1:${PORT}"
export SAN_API_TOKEN="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SAN_TOKENS="{\"demo\": \"$(printf %s "$SAN_API_TOKEN" | "$BIN/san" jobs hash-token)\"}"  # stdin: not in ps
export SAN_MLFLOW_URI="http://127.0.0.1:${MLFLOW_PORT}" SAN_MLFLOW_UI_URL="http://127.0.0.1:${MLFLOW_PORT}"
export SAN_STORAGE_ROOT="$STORAGE"
LOGS="$(mktemp -d -t san-demo.XXXXXX)"

for port in "$PORT" "$MLFLOW_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use: set SAN_DEMO_PORT / SAN_DEMO_MLFLOW_PORT to free ones" >&2; exit 2
  fi
done

# Each in its own process group, so stopping it stops its workers too (and nothing else). MLflow's GenAI job runner
# (8 processes this project never uses) off.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$BIN/mlflow" server --backend-store-uri "sqlite:///$STORAGE/mlflow.db" --artifacts-destination "$STORAGE/mlartifacts" \
  --host 127.0.0.1 \
  --port "$MLFLOW_PORT" --workers 1 >"$LOGS/mlflow.log" 2>&1 &
MLFLOW=$!
setsid "$BIN/san" serve --port "$PORT" >"$LOGS/serve.log" 2>&1 &
SERVER=$!
stop() {
  kill -TERM "$SERVER" 2>/dev/null && { wait "$SERVER" 2>/dev/null || true; }  # it stops its own Ray head
  kill -TERM -- "-$MLFLOW" 2>/dev/null && { wait "$MLFLOW" 2>/dev/null || true; }
}
trap stop EXIT
for _ in $(seq 180); do
  curl -sf "$SAN_API_URL/healthz" >/dev/null && curl -sf "$SAN_MLFLOW_URI/health" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { echo "san serve exited; its log:"; cat "$LOGS/serve.log"; exit 1; }
  kill -0 "$MLFLOW" 2>/dev/null || { echo "mlflow server exited; its log:"; cat "$LOGS/mlflow.log"; exit 1; }
  sleep 1
done
echo "service at $SAN_API_URL, MLflow at $SAN_MLFLOW_URI (logs: $LOGS)"

"$BIN/san" study submit "$@" --wait --poll-s 5 | tee "$LOGS/study.txt"
STUDY="$(head -1 "$LOGS/study.txt" | cut -d' ' -f1)"
for _ in $(seq 60); do  # the service writes the figures once the last child has ended
  [ -d "$STORAGE/studies/$STUDY/figures" ] && break
  sleep 1
done
EXPERIMENT="$(curl -s -H "Authorization: Bearer $SAN_API_TOKEN" "$SAN_API_URL/v1/studies/$STUDY?table=false" |
  "$BIN/python" -c 'import json, sys; s = json.load(sys.stdin)["spec"]; print(s["base"]["tracking"]["experiment"] or "san/" + s["base"]["data"]["dataset"])')"
EXPERIMENT_ID="$(curl -s -G "$SAN_MLFLOW_URI/api/2.0/mlflow/experiments/get-by-name" --data-urlencode "experiment_name=$EXPERIMENT" |
  "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')"
# workflowType: MLflow 3.17's UI opens in its GenAI view unless the link (or the browser's last choice) says otherwise.
RUNS="#/experiments/$EXPERIMENT_ID?workflowType=machine_learning"
echo
echo "tables and figures: $STORAGE/studies/$STUDY/  ($(ls "$STORAGE/studies/$STUDY/figures" 2>/dev/null | tr '\n' ' '))"
echo "MLflow UI (while the demo runs): $SAN_MLFLOW_URI/$RUNS — experiment $EXPERIMENT, the study's parent run"
echo "(tag san.study_id=$STUDY) with its children nested. To browse it later:"
echo "  $BIN/mlflow server --backend-store-uri sqlite:///$STORAGE/mlflow.db --artifacts-destination $STORAGE/mlartifacts --port $MLFLOW_PORT  → http://127.0.0.1:$MLFLOW_PORT/$RUNS"
