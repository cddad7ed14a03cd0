#!/usr/bin/env bash
# The cost of statistics and request metrics: the same Backstop build with
# `[stats] enabled = true` and `false`, side by side in one run, interleaved
# rounds of wrk against each, on 127.0.0.1. Target: on ≥ 0.97 × off.
#
#   bench/stats.sh                                   # 5 rounds x 10 s each
#   BENCH_DURATION=5s BENCH_ROUNDS=3 bench/stats.sh  # quicker
#
# Environment (all optional):
#   BENCH_DURATION, BENCH_ROUNDS, BENCH_CONNECTIONS (default 10s, 5, 64)
#   BENCH_PORT_BASE   first of 5 consecutive ports (default 18180)
#   BENCH_NO_BUILD=1  use the binaries already in target/release
# On a shared machine the numbers are indicative only.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-5}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
BASE=${BENCH_PORT_BASE:-18180}
BACKEND_PORT=$BASE
declare -A PORT=([on]=$((BASE + 1)) [off]=$((BASE + 2)))
declare -A ADMIN=([on]=$((BASE + 3)) [off]=$((BASE + 4)))

log() { printf '[stats-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v wrk >/dev/null || {
    log "installing wrk"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk
}
command -v curl >/dev/null || die "curl is required"

if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    log "building Backstop (release)"
    (cd "$ROOT" && cargo build --release --bin backstop --example backend)
fi
BACKSTOP_BIN=$TARGET_DIR/release/backstop
BACKEND_BIN=$TARGET_DIR/release/examples/backend
[[ -x $BACKSTOP_BIN && -x $BACKEND_BIN ]] || die "release binaries missing"

TMP=$(mktemp -d -t backstop-stats-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_ready() {
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    die "$1 did not come up"
}

"$BACKEND_BIN" "127.0.0.1:$BACKEND_PORT" --quiet >"$TMP/backend.log" 2>&1 &
PIDS+=($!)
wait_ready "http://127.0.0.1:$BACKEND_PORT/bench/small"

for mode in on off; do
    enabled=true
    [[ $mode == off ]] && enabled=false
    mkdir -p "$TMP/$mode"
    cat >"$TMP/$mode/backstop.toml" <<TOML
[server]
listen = "127.0.0.1:${PORT[$mode]}"
admin_listen = "127.0.0.1:${ADMIN[$mode]}"
data_dir = "$TMP/$mode/data"
workers = 1

[log]
level = "warn"

[replay]
enabled = false

[stats]
enabled = $enabled

[[routes]]
name = "bench"
path_prefix = "/bench"
upstreams = ["http://127.0.0.1:$BACKEND_PORT"]
  [routes.retry]
  max_attempts = 1
  [routes.capture]
  enabled = false
TOML
    "$BACKSTOP_BIN" run -c "$TMP/$mode/backstop.toml" >"$TMP/$mode/log" 2>&1 &
    PIDS+=($!)
    wait_ready "http://127.0.0.1:${PORT[$mode]}/bench/small"
done

# Requests per second of one wrk run.
rps() {
    wrk -t1 -c"$CONNECTIONS" -d"$1" "http://127.0.0.1:${PORT[$2]}/bench/small" \
        | awk '/Requests\/sec/ {print $2}'
}

log "warm-up"
rps 2s on >/dev/null
rps 2s off >/dev/null
declare -A RESULTS=([on]="" [off]="")
for round in $(seq "$ROUNDS"); do
    for mode in on off; do
        r=$(rps "$DURATION" "$mode")
        RESULTS[$mode]+="$r "
        log "round $round: stats $mode: $r req/s"
    done
done

curl -fsS "http://127.0.0.1:${ADMIN[on]}/api-stats?api=bench" \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print("stats counted", s["total"], "requests; p99", s["response_time"]["p99"], "ms")' >&2

python3 - "${RESULTS[on]}" "${RESULTS[off]}" <<'PY'
import statistics, sys
on = [float(x) for x in sys.argv[1].split()]
off = [float(x) for x in sys.argv[2].split()]
m_on, m_off = statistics.median(on), statistics.median(off)
print(f"stats on : median {m_on:,.0f} req/s  runs {', '.join(f'{x:,.0f}' for x in on)}")
print(f"stats off: median {m_off:,.0f} req/s  runs {', '.join(f'{x:,.0f}' for x in off)}")
print(f"on / off : {m_on / m_off:.3f}  (target >= 0.97; indicative on a shared machine)")
PY
