# Shared by the bench scripts: tools, a temp dir cleaned up on exit, nginx and
# tollgate started on free loopback ports, and the wrk comparison.
# Source it after `set -euo pipefail`.

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOLLGATE=${TOLLGATE:-$ROOT/build/tollgate}
NGINX=${NGINX:-/usr/sbin/nginx}
WRK=${WRK:-wrk}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}

die() { echo "$(basename "$0" .sh): $*" >&2; exit 1; }

[ -x "$TOLLGATE" ] || die "no tollgate binary at $TOLLGATE: build it first (cmake + ninja tollgate) or set TOLLGATE="
[ -x "$NGINX" ] || die "nginx not found at $NGINX (apt-get install nginx-light)"
command -v "$WRK" >/dev/null || die "wrk not found (apt-get install wrk)"
command -v sqlite3 >/dev/null || die "sqlite3 not found (apt-get install sqlite3)"
command -v curl >/dev/null || die "curl not found (apt-get install curl)"

WORK=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
TOLLGATE_PID=""
APP_PID=""  # a second nginx, when the bench needs one
NGINX_PID=""
cleanup() {
  for pid in $TOLLGATE_PID $NGINX_PID $APP_PID; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $TOLLGATE_PID $NGINX_PID $APP_PID; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nobody listens on: bind to 0 and let the kernel choose.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wrk prints latencies as 812.00us, 1.23ms or 1.05s: normalise to ms.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
    printf "%.3f", n }'
}

# Polls until `curl ARGS...` gets HTTP 200, at most ~10 s.
wait_200() {
  local i
  for i in $(seq 1 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" || true)" = 200 ] && return 0
    sleep 0.05
  done
  return 1
}

# Starts nginx in the background from the body of its http block, read on stdin.
start_nginx() {  # NAME WORKERS
  local name=$1 workers=$2 dir=$WORK/$1
  mkdir -p "$dir/logs"
  {
    # As root nginx would switch its workers to the default user anyway; say so
    # explicitly. As anyone else the directive only draws a warning, so omit it.
    if [ "$(id -u)" = 0 ]; then echo "user nobody nogroup;"; fi
    cat <<EOF
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
EOF
    cat
    echo "}"
  } >"$dir/nginx.conf"
  "$NGINX" -p "$dir" -c "$dir/nginx.conf" >"$dir/logs/stdout.log" 2>&1 &
}

# Starts tollgate with "$WORK/tollgate.yaml" on the database $DB; sets
# TOLLGATE_PID and TOLLGATE_PORT.
start_tollgate() {
  "$TOLLGATE" serve --config "$WORK/tollgate.yaml" --listen 127.0.0.1:0 --db "$DB" >"$WORK/tollgate.log" 2>&1 &
  TOLLGATE_PID=$!
  TOLLGATE_PORT=""
  for _ in $(seq 1 200); do
    TOLLGATE_PORT=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/tollgate.log" | head -1)
    [ -n "$TOLLGATE_PORT" ] && break
    kill -0 "$TOLLGATE_PID" 2>/dev/null || die "tollgate exited: $(cat "$WORK/tollgate.log")"
    sleep 0.05
  done
  [ -n "$TOLLGATE_PORT" ] || die "tollgate did not start: $(cat "$WORK/tollgate.log")"
}

# Creates a key, waits until PATH answers 200 with it through tollgate, then
# runs wrk against PATH on tollgate and on nginx ($NGINX_PORT), stops tollgate
# (which flushes its usage rows) and prints both, the ratios and the rows.
compare_with_nginx() {  # PATH DESCRIPTION
  local path=$1 description=$2
  KEY=$("$TOLLGATE" keys create --user bench --db "$DB" | tail -1)
  # Keys made by the CLI reach the running gateway within its 1 s refresh.
  wait_200 -H "Authorization: Bearer $KEY" "http://127.0.0.1:$TOLLGATE_PORT$path" ||
    die "tollgate never accepted the key on $path: $(cat "$WORK/tollgate.log")"

  run_wrk() {  # NAME URL [wrk args...]
    local name=$1 url=$2
    shift 2
    echo "== $name: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency $url" >&2
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url" | tee "$WORK/$name.wrk" >&2
  }

  field() {  # FILE WHAT
    case $2 in
      rps) awk '/^Requests\/sec:/ {print $2}' "$1" ;;
      p50) to_ms "$(awk '$1 == "50%" {print $2}' "$1")" ;;
      p99) to_ms "$(awk '$1 == "99%" {print $2}' "$1")" ;;
      requests) awk '/requests in/ {print $1}' "$1" ;;
      errors) awk '/Non-2xx or 3xx responses:/ {print $NF}' "$1" ;;
    esac
  }

  rows() { sqlite3 "$DB" "SELECT COUNT(*) FROM usage_events WHERE route = '$path' AND status = 200;"; }

  # Rows the probes above wrote are flushed within the interval; count them out.
  sleep 1.5
  ROWS_BEFORE=$(rows)
  # Rounds alternate the two so a burst of other load on the machine hits
  # both alike; the median round's ratio is the figure.
  local round T_REQ=0 ratios=""
  echo
  echo "$description, $THREADS wrk threads, $CONNECTIONS connections, $DURATION, loopback, $(nproc) cores"
  printf '%-6s %-10s %12s %10s %10s %8s\n' round "" "requests/s" "p50 ms" "p99 ms" "non-2xx"
  for round in $(seq 1 "$ROUNDS"); do
    run_wrk tollgate "http://127.0.0.1:$TOLLGATE_PORT$path" -H "Authorization: Bearer $KEY"
    run_wrk nginx "http://127.0.0.1:$NGINX_PORT$path"
    T_RPS=$(field "$WORK/tollgate.wrk" rps)
    N_RPS=$(field "$WORK/nginx.wrk" rps)
    T_REQ=$((T_REQ + $(field "$WORK/tollgate.wrk" requests)))
    printf '%-6s %-10s %12s %10s %10s %8s\n' "$round" tollgate "$T_RPS" "$(field "$WORK/tollgate.wrk" p50)" \
      "$(field "$WORK/tollgate.wrk" p99)" "$(field "$WORK/tollgate.wrk" errors | grep . || echo 0)"
    printf '%-6s %-10s %12s %10s %10s %8s\n' "" nginx "$N_RPS" "$(field "$WORK/nginx.wrk" p50)" \
      "$(field "$WORK/nginx.wrk" p99)" "$(field "$WORK/nginx.wrk" errors | grep . || echo 0)"
    ratio=$(awk -v t="$T_RPS" -v n="$N_RPS" 'BEGIN { printf "%.2f", t / n }')
    echo "       tollgate/nginx throughput $ratio"
    ratios="$ratios $ratio"
  done

  # A graceful stop writes every queued row before the process exits.
  kill -TERM "$TOLLGATE_PID"
  wait "$TOLLGATE_PID" || die "tollgate exited non-zero on SIGTERM: $(tail -5 "$WORK/tollgate.log")"
  TOLLGATE_PID=""
  ROWS=$(( $(rows) - ROWS_BEFORE ))

  echo "$ratios" | tr ' ' '\n' | sed '/^$/d' | sort -n |
    awk '{ r[NR] = $1 } END { printf "tollgate/nginx throughput, median of %d rounds: %s (min %s, max %s)\n", NR, r[int((NR + 1) / 2)], r[1], r[NR] }'
  echo "usage rows written during the tollgate runs: $ROWS (wrk completed $T_REQ requests)"
}

# nginx (2 workers) proxying to the app on 127.0.0.1:APP_PORT with a keep-alive
# pool, on a free port: sets NGINX_PORT and NGINX_PID.
start_nginx_proxy() {  # APP_PORT
  NGINX_PORT=$(free_port)
  start_nginx proxy 2 <<EOF
  upstream app {
    server 127.0.0.1:$1;
    keepalive 128;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
EOF
  NGINX_PID=$!
  wait_200 "http://127.0.0.1:$NGINX_PORT/app/hello" || die "nginx did not come up: $(cat "$WORK/proxy/logs/"*.log)"
}
