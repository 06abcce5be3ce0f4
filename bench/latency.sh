#!/usr/bin/env bash
# Latency at a fixed request rate, which wrk cannot measure: tollgate_fixed_rate
# (open loop, latency from each request's intended send time) at RATE req/s
# against a trivial app (nginx `return 200`) directly, through nginx
# `proxy_pass` with a keepalive pool, and through tollgate's app reverse proxy
# with a real key (auth, quota admission, metering). Then streaming
# time-to-first-byte at RATE_STREAM req/s: an SSE answer from the same nginx
# directly, and through tollgate's `type: openai` backend (POST
# /v1/chat/completions, "stream": true). RUNS rounds, the targets interleaved
# within each round so a change in the machine's load hits all of them.
#
# Usage: bench/latency.sh              (from anywhere; builds nothing)
# Env:   TOLLGATE=path/to/tollgate  FIXED_RATE=path/to/tollgate_fixed_rate (default: bench/ of the build dir of tollgate)
#        RATE=10000  RATE_STREAM=500  DURATION=10s  WARMUP=1s  CONNECTIONS=64  CONNECTIONS_STREAM=16  RUNS=3
set -euo pipefail

. "$(dirname "$0")/lib.sh"

FIXED_RATE=${FIXED_RATE:-$(dirname "$TOLLGATE")/bench/tollgate_fixed_rate}
RATE=${RATE:-10000}
RATE_STREAM=${RATE_STREAM:-500}
WARMUP=${WARMUP:-1s}
CONNECTIONS_STREAM=${CONNECTIONS_STREAM:-16}
RUNS=${RUNS:-3}
[ -x "$FIXED_RATE" ] || die "no load generator at $FIXED_RATE: build it (ninja tollgate_fixed_rate) or set FIXED_RATE="

# --- the app: a small JSON body, and an SSE answer for the streaming part ---
# `ssi on` makes nginx drop Content-Length and send the answer chunked, as a
# streaming upstream does; the events are the shape OpenAI streams.
APP_PORT=$(free_port)
start_nginx app 2 <<EOF
  server {
    listen 127.0.0.1:$APP_PORT;
    location / {
      default_type application/json;
      return 200 '{"hello":"from the app"}';
    }
    location = /v1/chat/completions {
      default_type text/event-stream;
      ssi on;
      ssi_types text/event-stream;
      return 200 'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}]}\n\ndata: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" from the app"},"finish_reason":null}]}\n\ndata: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\ndata: [DONE]\n\n';
    }
  }
EOF
APP_PID=$!
wait_200 "http://127.0.0.1:$APP_PORT/app/hello" || die "the app did not come up: $(cat "$WORK/app/logs/"*.log)"

# --- nginx as the reverse proxy, with a keep-alive pool to the app ----------
start_nginx_proxy "$APP_PORT"

# --- tollgate: the app behind it, and the same nginx as an openai upstream ---
DB=$WORK/tollgate.db
cat >"$WORK/tollgate.yaml" <<EOF
app_upstream: http://127.0.0.1:$APP_PORT
metering: {flush_interval: 1s}
backends:
  - {name: echo, type: echo}
  - {name: sse, type: openai, base_url: http://127.0.0.1:$APP_PORT/v1, max_connections: 64}
models:
  - name: echo
    deployments: [{backend: echo}]
  - name: fake
    deployments: [{backend: sse, model: normal}]
EOF
start_tollgate
KEY=$("$TOLLGATE" keys create --user bench --db "$DB" | tail -1)
STREAM_BODY='{"model":"fake","messages":[{"role":"user","content":"hi"}],"stream":true}'
# Keys made by the CLI reach the running gateway within its 1 s refresh.
wait_200 -H "Authorization: Bearer $KEY" "http://127.0.0.1:$TOLLGATE_PORT/app/hello" ||
  die "tollgate never accepted the key: $(cat "$WORK/tollgate.log")"
curl -sf -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$STREAM_BODY" \
  "http://127.0.0.1:$TOLLGATE_PORT/v1/chat/completions" | grep -q '^data: \[DONE\]' ||
  die "tollgate did not stream from the SSE upstream: $(tail -5 "$WORK/tollgate.log")"

rows() { sqlite3 "$DB" "SELECT COUNT(*) FROM usage_events WHERE route = '$1' AND status = 200;"; }
sleep 1.5  # rows from the probes above are flushed within the interval; count them out
APP_ROWS_BEFORE=$(rows /app/hello)
STREAM_ROWS_BEFORE=$(rows /v1/chat/completions)

# Runs the generator; its report goes to $WORK/NAME.RUN and to stderr.
measure() {  # NAME RUN RATE CONNECTIONS PORT [tollgate_fixed_rate args...]
  local name=$1 run=$2 rate=$3 connections=$4 port=$5
  shift 5
  echo "== run $run, $name: $rate req/s, $connections connections, $DURATION (+$WARMUP warmup)" >&2
  # Errors are reported in the table, not fatal: the other targets still run.
  "$FIXED_RATE" --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" --connections "$connections" \
    "$@" "127.0.0.1:$port" >"$WORK/$name.$run" 2>&1 || true
  sed 's/^/   /' "$WORK/$name.$run" >&2
  # One line per run and target: run name achieved errors non2xx p50 p99 p99.9 ttfb-p50 ttfb-p99 send-lag-p99
  awk -v run="$run" -v name="$name" '
    $1 == "requests" { errors = $7; non2xx = $9 }
    $1 == "rate" { achieved = $5 }
    $1 == "latency" { p50 = $2; p99 = $4; p999 = $5 }
    $1 == "ttfb" { t50 = $2; t99 = $4 }
    $1 == "send_lag" { lag99 = $4 }
    END { print run, name, achieved + 0, errors + 0, non2xx + 0, p50 + 0, p99 + 0, p999 + 0, t50 + 0, t99 + 0, lag99 + 0 }
  ' "$WORK/$name.$run" >>"$WORK/results"
}

LOAD_BEFORE=$(uptime)
AUTH=(-H "Authorization: Bearer $KEY")
for run in $(seq 1 "$RUNS"); do
  measure direct "$run" "$RATE" "$CONNECTIONS" "$APP_PORT" --path /app/hello
  measure nginx "$run" "$RATE" "$CONNECTIONS" "$NGINX_PORT" --path /app/hello
  measure tollgate "$run" "$RATE" "$CONNECTIONS" "$TOLLGATE_PORT" --path /app/hello "${AUTH[@]}"
  measure sse-direct "$run" "$RATE_STREAM" "$CONNECTIONS_STREAM" "$APP_PORT" --path /v1/chat/completions \
    --body "$STREAM_BODY" --expect '[DONE]'
  measure sse-tollgate "$run" "$RATE_STREAM" "$CONNECTIONS_STREAM" "$TOLLGATE_PORT" --path /v1/chat/completions \
    --body "$STREAM_BODY" --expect '[DONE]' "${AUTH[@]}"
done
LOAD_AFTER=$(uptime)

# A graceful stop writes every queued row before the process exits.
kill -TERM "$TOLLGATE_PID"
wait "$TOLLGATE_PID" || die "tollgate exited non-zero on SIGTERM: $(tail -5 "$WORK/tollgate.log")"
TOLLGATE_PID=""
APP_ROWS=$(($(rows /app/hello) - APP_ROWS_BEFORE))
STREAM_ROWS=$(($(rows /v1/chat/completions) - STREAM_ROWS_BEFORE))

seconds() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /ms$/) n /= 1000; else if (v ~ /m$/) n *= 60; print n }'; }
SENT_APP=$(awk -v r="$RATE" -v d="$(seconds "$DURATION")" -v w="$(seconds "$WARMUP")" -v n="$RUNS" 'BEGIN { printf "%.0f", r * (d + w) * n }')
SENT_STREAM=$(awk -v r="$RATE_STREAM" -v d="$(seconds "$DURATION")" -v w="$(seconds "$WARMUP")" -v n="$RUNS" 'BEGIN { printf "%.0f", r * (d + w) * n }')

echo
echo "Fixed-rate latency on loopback, $(nproc) cores, $RUNS runs of $DURATION (+$WARMUP warmup) each; ms from the intended send time"
echo "(gen lag: the generator's own send delay on idle connections; when it is high the machine, not the target, was busy)"
echo "load before: $LOAD_BEFORE"
echo "load after:  $LOAD_AFTER"
awk -v rate="$RATE" -v rate_stream="$RATE_STREAM" -v conns="$CONNECTIONS" -v conns_stream="$CONNECTIONS_STREAM" '
  { run = $1; name = $2
    rps[name, run] = $3; err[name, run] = $4; bad[name, run] = $5
    p50[name, run] = $6; p99[name, run] = $7; p999[name, run] = $8; t50[name, run] = $9; t99[name, run] = $10
    lag[name, run] = $11
    if (run > runs) runs = run }
  # Best (lowest) and spread (lowest to highest) of one figure over the runs.
  function summary(arr, name, fmt,   r, lo, hi) {
    lo = ""; hi = ""
    for (r = 1; r <= runs; r++) {
      if (lo == "" || arr[name, r] < lo) lo = arr[name, r]
      if (hi == "" || arr[name, r] > hi) hi = arr[name, r]
    }
    return sprintf(fmt " (" fmt ".." fmt ")", lo, lo, hi)
  }
  function added(a, b, pct,   r) {
    for (r = 1; r <= runs; r++) {
      if (pct == 50) d[a, r] = p50[a, r] - p50[b, r]; else if (pct == 99) d[a, r] = p99[a, r] - p99[b, r]
      else if (pct == -50) d[a, r] = t50[a, r] - t50[b, r]; else d[a, r] = t99[a, r] - t99[b, r]
    }
    return summary(d, a, "%.3f")
  }
  function table(names, n, label, ttfb,   i, name, r) {
    printf "\n%s\n", label
    printf "%-13s %4s %10s %7s %8s %9s %9s %9s", "", "run", "req/s", "errors", "non-2xx", "p50", "p99", "p99.9"
    if (ttfb) printf " %10s %10s", "ttfb p50", "ttfb p99"
    printf " %12s\n", "gen lag p99"
    for (i = 1; i <= n; i++) for (r = 1; r <= runs; r++) {
      name = names[i]
      printf "%-13s %4d %10.1f %7d %8d %9.3f %9.3f %9.3f", name, r, rps[name, r], err[name, r], bad[name, r],
        p50[name, r], p99[name, r], p999[name, r]
      if (ttfb) printf " %10.3f %10.3f", t50[name, r], t99[name, r]
      printf " %12.3f\n", lag[name, r]
    }
  }
  END {
    split("direct nginx tollgate", app, " ")
    table(app, 3, sprintf("GET /app/hello at %d req/s over %d connections", rate, conns), 0)
    printf "\nbest (spread) over %d runs       p50                    p99\n", runs
    for (i = 1; i <= 3; i++)
      printf "%-28s %-22s %s\n", app[i], summary(p50, app[i], "%.3f"), summary(p99, app[i], "%.3f")
    printf "%-28s %-22s %s\n", "added by nginx", added("nginx", "direct", 50), added("nginx", "direct", 99)
    printf "%-28s %-22s %s\n", "added by tollgate", added("tollgate", "direct", 50), added("tollgate", "direct", 99)
    for (r = 1; r <= runs; r++) pr["x", r] = p99["nginx", r] > 0 ? p99["tollgate", r] / p99["nginx", r] : 0
    printf "tollgate/nginx p99 %s; added p99 per run (tollgate/nginx):", summary(pr, "x", "%.2f")
    for (r = 1; r <= runs; r++) {
      tn = p99["tollgate", r] - p99["direct", r]; nn = p99["nginx", r] - p99["direct", r]
      if (nn > 0 && tn > 0) printf " %.3f/%.3f = %.2f;", tn, nn, tn / nn; else printf " %.3f/%.3f = n/a;", tn, nn
    }
    printf "\n"

    split("sse-direct sse-tollgate", sse, " ")
    table(sse, 2, sprintf("POST /v1/chat/completions, stream: true, at %d req/s over %d connections", rate_stream, conns_stream), 1)
    printf "\nbest (spread) over %d runs       ttfb p50               ttfb p99\n", runs
    for (i = 1; i <= 2; i++)
      printf "%-28s %-22s %s\n", sse[i], summary(t50, sse[i], "%.3f"), summary(t99, sse[i], "%.3f")
    printf "%-28s %-22s %s\n", "added by tollgate", added("sse-tollgate", "sse-direct", -50), added("sse-tollgate", "sse-direct", -99)
  }
' "$WORK/results"
echo
echo "usage rows written: $APP_ROWS for /app/hello (≈ $SENT_APP sent, warmup included), $STREAM_ROWS for streams (≈ $SENT_STREAM sent)"
