#!/usr/bin/env bash
# Front-door overhead: wrk against `GET /v1/models` on tollgate (API key
# check, quota admission, a metered usage row per request) and on nginx
# answering the same JSON from a `return`, both on loopback. Prints
# requests/s, p50 and p99 for each, the ratio, and the usage rows written.
#
# Usage: bench/front_door.sh            (from anywhere; builds nothing)
# Env:   TOLLGATE=path/to/tollgate  DURATION=10s  CONNECTIONS=64  THREADS=2  ROUNDS=3
set -euo pipefail

. "$(dirname "$0")/lib.sh"

# --- nginx: the same small JSON from a `return` ----------------------------
NGINX_PORT=$(free_port)
start_nginx nginx 2 <<EOF
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location = /v1/models {
      default_type application/json;
      return 200 '{"object":"list","data":[]}';
    }
  }
EOF
NGINX_PID=$!
wait_200 "http://127.0.0.1:$NGINX_PORT/v1/models" || die "nginx did not come up: $(cat "$WORK/nginx/logs/"*.log)"

# --- tollgate ------------------------------------------------------------
DB=$WORK/tollgate.db
cat >"$WORK/tollgate.yaml" <<EOF
metering: {flush_interval: 1s}
backends:
  - {name: echo, type: echo}
models:
  - name: echo
    deployments: [{backend: echo}]
EOF
start_tollgate
compare_with_nginx /v1/models "GET /v1/models"
