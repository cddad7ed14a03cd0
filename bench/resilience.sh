#!/usr/bin/env bash
# Cost of the resilience policies: one Backstop, two routes to the same
# backend, measured in the same run and interleaved:
#   plain     - no retry, no rate limit, breaker never trips (the baseline)
#   guarded   - breaker + retries (3 attempts, budget) + a rate limit that
#               every request passes (route key, far above the load)
# Target: guarded >= 0.97 x plain requests/s. Loopback, wrk, shared machine:
# numbers are indicative only.
#
#   bench/resilience.sh                       # 3 rounds x 10 s per route
#   BENCH_DURATION=3s BENCH_ROUNDS=1 bench/resilience.sh
#
# Uses target/release/backstop and target/release/examples/backend (build
# them first: cargo build --release --bin backstop --example backend).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
PORT_BASE=${BENCH_PORT_BASE:-18180}
BACKEND_PORT=$PORT_BASE
PROXY_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))

command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
for bin in "$TARGET_DIR/release/backstop" "$TARGET_DIR/release/examples/backend"; do
    [ -x "$bin" ] || { echo "missing $bin: cargo build --release --bin backstop --example backend" >&2; exit 1; }
done

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

cat >"$TMP/backstop.toml" <<TOML
[server]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
data_dir = "$TMP/data"
workers = 1

[log]
level = "warn"

[replay]
enabled = false

[[routes]]
name = "plain"
path_prefix = "/plain"
strip_prefix = true
upstreams = ["http://127.0.0.1:$BACKEND_PORT"]
  [routes.retry]
  max_attempts = 1
  [routes.capture]
  enabled = false

[[routes]]
name = "guarded"
path_prefix = "/guarded"
strip_prefix = true
upstreams = ["http://127.0.0.1:$BACKEND_PORT"]
  [routes.retry]
  max_attempts = 3
  [routes.capture]
  enabled = false
  [routes.circuit_breaker]
  failure_threshold = 5
  [routes.rate_limit]
  requests_per_second = 10000000
  burst = 10000000
  key = "route"
TOML

"$TARGET_DIR/release/examples/backend" "127.0.0.1:$BACKEND_PORT" --quiet &
PIDS+=($!)
"$TARGET_DIR/release/backstop" run -c "$TMP/backstop.toml" 2>"$TMP/backstop.log" &
PIDS+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PROXY_PORT/guarded/bench/small" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$PROXY_PORT/plain/bench/small" >/dev/null

rps() {
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$PROXY_PORT/$1/bench/small" \
        | awk '/Requests\/sec/ {print $2}'
}

wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$PROXY_PORT/plain/bench/small" >/dev/null
wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$PROXY_PORT/guarded/bench/small" >/dev/null

declare -A TOTAL=([plain]=0 [guarded]=0)
for round in $(seq "$ROUNDS"); do
    for route in plain guarded; do
        r=$(rps "$route")
        echo "round $round  $route  $r req/s"
        TOTAL[$route]=$(awk -v a="${TOTAL[$route]}" -v b="$r" 'BEGIN {print a + b}')
    done
done
plain=$(awk -v t="${TOTAL[plain]}" -v n="$ROUNDS" 'BEGIN {printf "%.0f", t / n}')
guarded=$(awk -v t="${TOTAL[guarded]}" -v n="$ROUNDS" 'BEGIN {printf "%.0f", t / n}')
ratio=$(awk -v g="$guarded" -v p="$plain" 'BEGIN {printf "%.3f", g / p}')
echo "mean: plain $plain req/s, guarded $guarded req/s, ratio $ratio (target >= 0.97; indicative)"
