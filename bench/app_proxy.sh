#!/usr/bin/env bash
# App reverse-proxy overhead: a trivial app (nginx answering `return 200` on a
# loopback port) fronted twice: by tollgate (API-key check, quota admission,
# X-Tollgate-* and X-Forwarded-* headers, one metered usage row per request,
# a keep-alive pool to the app) and by nginx `proxy_pass` with an upstream
# keepalive pool. wrk against both; prints requests/s, p50 and p99 for each,
# the ratio, and the usage rows written.
#
# Usage: bench/app_proxy.sh             (from anywhere; builds nothing)
# Env:   TOLLGATE=path/to/tollgate  DURATION=10s  CONNECTIONS=64  THREADS=2  ROUNDS=3  IO_THREADS=0
set -euo pipefail

. "$(dirname "$0")/lib.sh"

# --- the app: nginx answering a small JSON body -----------------------------
APP_PORT=$(free_port)
start_nginx app 2 <<EOF
  server {
    listen 127.0.0.1:$APP_PORT;
    location / {
      default_type application/json;
      return 200 '{"hello":"from the app"}';
    }
  }
EOF
APP_PID=$!
wait_200 "http://127.0.0.1:$APP_PORT/app/hello" || die "the app did not come up: $(cat "$WORK/app/logs/"*.log)"

# --- nginx as the reverse proxy, with a keep-alive pool to the app ----------
start_nginx_proxy "$APP_PORT"

# --- tollgate ------------------------------------------------------------
DB=$WORK/tollgate.db
cat >"$WORK/tollgate.yaml" <<EOF
app_upstream: http://127.0.0.1:$APP_PORT
io_threads: ${IO_THREADS:-0}
metering: {flush_interval: 1s}
backends:
  - {name: echo, type: echo}
models:
  - name: echo
    deployments: [{backend: echo}]
EOF
start_tollgate
compare_with_nginx /app/hello "GET /app/hello through a reverse proxy to a loopback app"
