#!/usr/bin/env bash
# The front door on each store, in one run: wrk against `GET /v1/models`
# (API-key check, quota admission, one metered usage row per request) on
# tollgate with a SQLite file and on tollgate with PostgreSQL (a server this
# script starts on a loopback port), rounds alternating. Prints requests/s,
# p50 and p99 for each, the ratio PostgreSQL/SQLite, and the usage rows each
# database holds against wrk's count.
#
# Then replicas on PostgreSQL behind nginx: one replica against two, with a
# key under a daily limit so admission runs through the shared budgets'
# leases (docs/quotas.md); the ratio two/one, and what the budget holds
# granted against the requests answered.
#
# Usage: bench/stores.sh                (from anywhere; builds nothing; as root, PostgreSQL runs as `postgres`)
# Env:   TOLLGATE=path/to/tollgate  DURATION=10s  CONNECTIONS=64  THREADS=2  ROUNDS=3
set -euo pipefail

. "$(dirname "$0")/lib.sh"

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
[ -x "$PG_BIN/initdb" ] || die "PostgreSQL not found in $PG_BIN (apt-get install postgresql)"
command -v psql >/dev/null || die "psql not found (apt-get install postgresql-client)"

# --- PostgreSQL in $WORK/pg, as the postgres user when we are root ----------
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PG_DIR=$WORK/pg
PG_PORT=$(free_port)
mkdir -p "$PG_DIR"
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U tollgate --auth=trust -E UTF8 --locale=C >"$PG_DIR/initdb.log" 2>&1 ||
  die "initdb failed: $(tail -5 "$PG_DIR/initdb.log")"
# Durable as a real deployment would be (fsync on), so the comparison is fair to SQLite.
(cd "$PG_DIR" && as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 \
  -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories='$PG_DIR'" start >/dev/null) ||
  die "PostgreSQL did not start: $(tail -5 "$PG_DIR/server.log")"
stop_pg() { (cd "$PG_DIR" && as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1) || true; }
REPLICA_PIDS=""
stop_replicas() {
  local pid
  for pid in $REPLICA_PIDS; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $REPLICA_PIDS; do wait "$pid" 2>/dev/null || true; done
  REPLICA_PIDS=""
}
trap 'stop_replicas; stop_pg; cleanup' EXIT
PG_URL=postgresql://tollgate@127.0.0.1:$PG_PORT/postgres

cat >"$WORK/tollgate.yaml" <<EOF
metering: {flush_interval: 1s}
backends:
  - {name: echo, type: echo}
models:
  - name: echo
    deployments: [{backend: echo}]
EOF

SQLITE_DB=$WORK/tollgate.db
rows() {  # DATABASE
  if [ "$1" = "$PG_URL" ]; then
    psql -At "$PG_URL" -c "SELECT COUNT(*) FROM usage_events WHERE route = '/v1/models' AND status = 200"
  else
    sqlite3 "$1" "SELECT COUNT(*) FROM usage_events WHERE route = '/v1/models' AND status = 200;"
  fi
}

declare -A KEYS REQS RPS
for DB in "$SQLITE_DB" "$PG_URL"; do
  KEYS[$DB]=$("$TOLLGATE" keys create --user bench --db "$DB" | tail -1)
  REQS[$DB]=0
done

echo
echo "GET /v1/models, $THREADS wrk threads, $CONNECTIONS connections, $DURATION, loopback, $(nproc) cores"
printf '%-6s %-11s %12s %10s %10s\n' round store "requests/s" "p50 ms" "p99 ms"
ratios=""
for round in $(seq 1 "$ROUNDS"); do
  for DB in "$SQLITE_DB" "$PG_URL"; do
    name=sqlite
    [ "$DB" = "$PG_URL" ] && name=postgresql
    start_tollgate
    wait_200 -H "Authorization: Bearer ${KEYS[$DB]}" "http://127.0.0.1:$TOLLGATE_PORT/v1/models" ||
      die "tollgate on $name never accepted the key: $(cat "$WORK/tollgate.log")"
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer ${KEYS[$DB]}" \
      "http://127.0.0.1:$TOLLGATE_PORT/v1/models" >"$WORK/$name.wrk"
    kill -TERM "$TOLLGATE_PID"
    wait "$TOLLGATE_PID" || die "tollgate on $name exited non-zero on SIGTERM: $(tail -5 "$WORK/tollgate.log")"
    TOLLGATE_PID=""
    RPS[$name]=$(awk '/^Requests\/sec:/ {print $2}' "$WORK/$name.wrk")
    REQS[$DB]=$((REQS[$DB] + $(awk '/requests in/ {print $1}' "$WORK/$name.wrk") + 1))  # +1: the wait_200 probe
    printf '%-6s %-11s %12s %10s %10s\n' "$round" "$name" "${RPS[$name]}" \
      "$(to_ms "$(awk '$1 == "50%" {print $2}' "$WORK/$name.wrk")")" \
      "$(to_ms "$(awk '$1 == "99%" {print $2}' "$WORK/$name.wrk")")"
  done
  ratio=$(awk -v p="${RPS[postgresql]}" -v s="${RPS[sqlite]}" 'BEGIN { printf "%.2f", p / s }')
  echo "       postgresql/sqlite throughput $ratio"
  ratios="$ratios $ratio"
done

echo "$ratios" | tr ' ' '\n' | sed '/^$/d' | sort -n |
  awk '{ r[NR] = $1 } END { printf "postgresql/sqlite throughput, median of %d rounds: %s (min %s, max %s)\n", NR, r[int((NR + 1) / 2)], r[1], r[NR] }'
for DB in "$SQLITE_DB" "$PG_URL"; do
  name=sqlite
  [ "$DB" = "$PG_URL" ] && name=postgresql
  echo "$name: $(rows "$DB") usage rows for ${REQS[$DB]} requests answered (wrk's count and the probes)"
done

# --- replicas on PostgreSQL behind nginx ------------------------------------
# Starts replica N on $PG_URL; appends its pid to REPLICA_PIDS, sets REPLICA_PORT.
start_replica() {  # N
  local log=$WORK/replica-$1.log
  "$TOLLGATE" serve --config "$WORK/tollgate.yaml" --listen 127.0.0.1:0 --db "$PG_URL" >"$log" 2>&1 &
  REPLICA_PIDS="$REPLICA_PIDS $!"
  REPLICA_PORT=""
  for _ in $(seq 1 200); do
    REPLICA_PORT=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -1)
    [ -n "$REPLICA_PORT" ] && return 0
    sleep 0.05
  done
  die "replica $1 did not start: $(cat "$log")"
}

LIMIT=1000000000
LIMITED_KEY=$("$TOLLGATE" keys create --user replicas --rpd "$LIMIT" --db "$PG_URL" | tail -1)
NGINX_PORT=$(free_port)
echo
echo "GET /v1/models through nginx (2 workers) to tollgate replicas on PostgreSQL, a key under rpd $LIMIT"
printf '%-6s %-11s %12s %10s %10s\n' round replicas "requests/s" "p50 ms" "p99 ms"
declare -A REPLICA_RPS
replica_ratios=""
answered=0
for round in $(seq 1 "$ROUNDS"); do
  for n in 1 2; do
    servers=""
    for i in $(seq 1 "$n"); do
      start_replica "$i"
      servers="$servers    server 127.0.0.1:$REPLICA_PORT max_fails=0;
"
    done
    start_nginx "nginx-$round-$n" 2 <<EOF
  upstream tollgate {
$servers    keepalive 64;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://tollgate;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
EOF
    NGINX_PID=$!
    wait_200 -H "Authorization: Bearer $LIMITED_KEY" "http://127.0.0.1:$NGINX_PORT/v1/models" ||
      die "nginx to $n replicas never answered: $(cat "$WORK"/replica-*.log)"
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer $LIMITED_KEY" \
      "http://127.0.0.1:$NGINX_PORT/v1/models" >"$WORK/replicas-$n.wrk"
    kill "$NGINX_PID"
    wait "$NGINX_PID" 2>/dev/null || true
    NGINX_PID=""
    stop_replicas
    REPLICA_RPS[$n]=$(awk '/^Requests\/sec:/ {print $2}' "$WORK/replicas-$n.wrk")
    answered=$((answered + $(awk '/requests in/ {print $1}' "$WORK/replicas-$n.wrk") + 1))
    printf '%-6s %-11s %12s %10s %10s\n' "$round" "$n" "${REPLICA_RPS[$n]}" \
      "$(to_ms "$(awk '$1 == "50%" {print $2}' "$WORK/replicas-$n.wrk")")" \
      "$(to_ms "$(awk '$1 == "99%" {print $2}' "$WORK/replicas-$n.wrk")")"
  done
  ratio=$(awk -v a="${REPLICA_RPS[2]}" -v b="${REPLICA_RPS[1]}" 'BEGIN { printf "%.2f", a / b }')
  echo "       two replicas / one: throughput $ratio"
  replica_ratios="$replica_ratios $ratio"
done
echo "$replica_ratios" | tr ' ' '\n' | sed '/^$/d' | sort -n |
  awk '{ r[NR] = $1 } END { printf "two replicas / one, median of %d rounds: %s (min %s, max %s)\n", NR, r[int((NR + 1) / 2)], r[1], r[NR] }'
# Leases given back at each stop: what stays granted is what was used.
granted=$(psql -At "$PG_URL" -c "SELECT COALESCE(SUM(granted), 0) FROM quota_budgets WHERE limit_name = 'requests_per_day'")
echo "shared budget: $granted requests granted for $answered answered, limit $LIMIT"
