#!/usr/bin/env bash
# The image's HEALTHCHECK, by the role docker/entrypoint.sh recorded in SAN_ROLE_FILE (/tmp/san-role).
#   api         GET :8000/healthz answers 2xx
#   ray-head    GET :8265/api/version (dashboard) answers 200, or 401 when token authentication is on
#   ray-worker  this node's raylet process is alive
#   mlflow      GET :5000/health answers 2xx
#   other       healthy (a one-off command: its exit status is what counts)
set -uo pipefail

role="$(cat "${SAN_ROLE_FILE:-/tmp/san-role}" 2>/dev/null || echo other)"

case "$role" in
    api)
        exec curl -fsS --max-time 5 -o /dev/null http://localhost:8000/healthz
        ;;
    ray-head)
        code="$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' http://localhost:8265/api/version)"
        [ "$code" = 200 ] || [ "$code" = 401 ] || { echo "ray dashboard answered HTTP $code" >&2; exit 1; }
        ;;
    ray-worker)
        # No procps in the image: read the process names from /proc.
        for comm in /proc/[0-9]*/comm; do
            [ "$(cat "$comm" 2>/dev/null)" = raylet ] && exit 0
        done
        echo "no raylet process" >&2
        exit 1
        ;;
    mlflow)
        exec curl -fsS --max-time 5 -o /dev/null http://localhost:5000/health
        ;;
    *)
        exit 0
        ;;
esac
