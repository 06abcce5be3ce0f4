#!/usr/bin/env bash
# The job API against a direct completion, on the echo backend, in one run:
# jobs accepted per second (POST /v2/bench/run: key check, quota admission and
# the job committed to SQLite before the answer) next to completions per second
# (POST /v1/completions), both with wrk at CONNECTIONS; then one client at a
# time, the p50/p99 of POST /v2/bench/runsync next to the same completion
# direct: the latency the job API adds. Prints the ratios.
#
# Usage: bench/jobs.sh                 (from anywhere; builds nothing)
# Env:   TOLLGATE=path/to/tollgate  DURATION=10s  CONNECTIONS=64  THREADS=2
set -euo pipefail

. "$(dirname "$0")/lib.sh"

DB=$WORK/tollgate.db
cat >"$WORK/tollgate.yaml" <<YAML
metering: {flush_interval: 1s}
backends:
  - {name: echo, type: echo}
models:
  - name: echo
    deployments: [{backend: echo}]
jobs:
  purge_interval: 10m
  endpoints:
    - {name: bench, model: echo, max_concurrency: 64, max_queue: 10000000}
YAML
start_tollgate
KEY=$("$TOLLGATE" keys create --user bench --db "$DB" | tail -1)
BASE=http://127.0.0.1:$TOLLGATE_PORT
wait_200 -H "Authorization: Bearer $KEY" "$BASE/v1/models" || die "tollgate never accepted the key"

post_script() {  # FILE BODY
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA
}
post_script "$WORK/completion.lua" '{"model":"echo","prompt":"hello job api","max_tokens":3}'
post_script "$WORK/job.lua" '{"input":{"prompt":"hello job api","sampling_params":{"max_tokens":3}}}'

run() {  # NAME CONNECTIONS URL SCRIPT
  local threads=$((THREADS < $2 ? THREADS : $2))  # wrk wants a connection per thread
  echo "== $1: wrk -t$threads -c$2 -d$DURATION --latency $3" >&2
  "$WRK" -t"$threads" -c"$2" -d"$DURATION" --latency -s "$4" "$3" | tee "$WORK/$1.wrk" >&2
}
rps() { awk '/^Requests\/sec/ { print $2 }' "$WORK/$1.wrk"; }
pct() { to_ms "$(awk -v p="$2" '$1 == p { print $2 }' "$WORK/$1.wrk")"; }
non2xx() { awk '/Non-2xx/ { print $NF }' "$WORK/$1.wrk"; }

run completions "$CONNECTIONS" "$BASE/v1/completions" "$WORK/completion.lua"
run jobs "$CONNECTIONS" "$BASE/v2/bench/run" "$WORK/job.lua"
run completion_one 1 "$BASE/v1/completions" "$WORK/completion.lua"
run runsync_one 1 "$BASE/v2/bench/runsync" "$WORK/job.lua"
for n in completions jobs completion_one runsync_one; do
  [ -z "$(non2xx $n)" ] || die "$n: $(non2xx $n) answers were not 2xx"
done

# Let the queued jobs drain before reading the table (bounded).
for _ in $(seq 1 600); do
  left=$(curl -s -H "Authorization: Bearer $KEY" "$BASE/v2/bench/health" |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"]; print(j["inQueue"] + j["inProgress"])' || echo "?")
  [ "$left" = 0 ] && break
  sleep 0.1
done
kill "$TOLLGATE_PID"
wait "$TOLLGATE_PID" || true
TOLLGATE_PID=""

echo
printf '%-38s %12s\n' "completions/s (POST /v1/completions)" "$(rps completions)"
printf '%-38s %12s\n' "jobs accepted/s (POST /v2/bench/run)" "$(rps jobs)"
awk -v a="$(rps jobs)" -v b="$(rps completions)" 'BEGIN { printf "%-38s %12.2f\n", "ratio jobs/completions", a / b }'
printf '%-38s %8s ms p50 %8s ms p99\n' "completion, one client" "$(pct completion_one 50%)" "$(pct completion_one 99%)"
printf '%-38s %8s ms p50 %8s ms p99\n' "runsync, one client" "$(pct runsync_one 50%)" "$(pct runsync_one 99%)"
awk -v a="$(pct runsync_one 50%)" -v b="$(pct completion_one 50%)" \
  'BEGIN { printf "%-38s %12.3f ms\n", "runsync adds at p50", a - b }'
echo "jobs stored: $(sqlite3 "$DB" "SELECT COUNT(*) FROM jobs"), completed: $(sqlite3 "$DB" "SELECT COUNT(*) FROM jobs WHERE state = 'COMPLETED'")"
