#!/usr/bin/env bash
# Capture benchmark: durable captures per second into the embedded spool and
# into Kafka (Tansu), at 64 and 256 concurrent clients, with p50/p99 capture
# latency and records per fsync (spool); then replay throughput into a healthy
# backend. Everything on 127.0.0.1, bounded in time. See bench/README.md.
#
#   bench/capture.sh                       # 3 rounds x 10 s per case
#   BENCH_DURATION=3s BENCH_ROUNDS=1 bench/capture.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
PORT=${BENCH_PORT_BASE:-18180}
ADMIN=$((PORT + 1))
DEAD=$((PORT + 2))       # nothing listens here: every POST is refused and captured
BACKEND=$((PORT + 3))
KAFKA=$((PORT + 4))
WORK=$(mktemp -d)
PIDS=()

log() { printf '[capture-bench] %s\n' "$*" >&2; }
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    bash "$ROOT/scripts/stop-tansu.sh" "$KAFKA" "$WORK/tansu" >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk; }
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --bin backstop --example backend)
fi
BACKSTOP=$TARGET_DIR/release/backstop

config() { # $1 = data dir, $2 = upstream port, $3 = replay enabled, $4 = extra sections
    cat <<TOML
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
data_dir = "$1"
[log]
level = "warn"
[replay]
enabled = $3
initial_delay = "100ms"
max_delay = "1s"
$4
[[routes]]
name = "bench"
path_prefix = "/"
upstreams = ["http://127.0.0.1:$2"]
  [routes.retry]
  max_attempts = 1
TOML
}

start_backstop() { # $1 = config file
    "$BACKSTOP" run -c "$1" >"$WORK/backstop.log" 2>&1 &
    BACKSTOP_PID=$!
    PIDS+=("$BACKSTOP_PID")
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return; sleep 0.1; done
    log "backstop did not start"; cat "$WORK/backstop.log" >&2; exit 1
}
stop_backstop() { kill "$BACKSTOP_PID"; wait "$BACKSTOP_PID" 2>/dev/null || true; }

queue() { curl -sf "http://127.0.0.1:$ADMIN/queue"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

# wrk with the POST script; prints "req/s p50_ms p99_ms non2xx" (all answers are 503 captured).
run_wrk() { # $1 = connections
    wrk -t2 -c"$1" -d"$DURATION" --latency -s "$BENCH_DIR/post.lua" "http://127.0.0.1:$PORT/bench" >"$WORK/wrk.txt"
    python3 - "$WORK/wrk.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(label):
    m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)", t, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
print(f"{rps:.0f} {ms(50):.2f} {ms(99):.2f} {errors.group(1) if errors else 0}")
PY
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

bench_sink() { # $1 = sink name, $2 = extra config
    local results=()
    for c in 64 256; do
        local rps=() p50=() p99=()
        for r in $(seq "$ROUNDS"); do
            rm -rf "$WORK/data"
            config "$WORK/data" "$DEAD" false "$2" >"$WORK/capture.toml"
            start_backstop "$WORK/capture.toml"
            read -r x y z n < <(run_wrk "$c")
            local q; q=$(queue)
            local depth commits written
            depth=$(echo "$q" | field '["depth"]')
            commits=$(echo "$q" | field '["spool_commits"]')
            written=$(echo "$q" | field '["spool_records_written"]')
            stop_backstop
            log "$1 c=$c round $r: ${x} captures/s p50 ${y} ms p99 ${z} ms (503 answers: $n, queued: $depth, records per fsync: $(python3 -c "print(round($written/max($commits,1),1))"))"
            rps+=("$x"); p50+=("$y"); p99+=("$z")
        done
        echo "| $1 | $c | $(printf '%s\n' "${rps[@]}" | median) | $(printf '%s\n' "${p50[@]}" | median) | $(printf '%s\n' "${p99[@]}" | median) |"
    done
}

echo "| sink | clients | captures/s (median) | p50 ms | p99 ms |"
echo "| --- | --- | --- | --- | --- |"
bench_sink spool ""

if [[ ${BENCH_KAFKA:-1} == 1 ]]; then
    bash "$ROOT/scripts/install-tansu.sh" >/dev/null
    bash "$ROOT/scripts/start-tansu.sh" "$KAFKA" "$WORK/tansu" >/dev/null
    python3 "$ROOT/scripts/kafka_tool.py" create-topic --brokers "127.0.0.1:$KAFKA" --topic failed-requests --partitions 1 >/dev/null
    bench_sink kafka "[kafka]
brokers = \"127.0.0.1:$KAFKA\""
fi

# Replay throughput: capture N records with replay off, then start a healthy
# backend and Backstop with replay on, and time the drain.
N=${BENCH_REPLAY_RECORDS:-20000}
rm -rf "$WORK/data"
config "$WORK/data" "$BACKEND" false "" >"$WORK/fill.toml"
start_backstop "$WORK/fill.toml"
wrk -t2 -c64 -d30s -s "$BENCH_DIR/post.lua" "http://127.0.0.1:$PORT/bench" >/dev/null &
WRK=$!
while (( $(queue | field '["depth"]') < N )); do sleep 0.2; done
kill "$WRK" 2>/dev/null || true; wait "$WRK" 2>/dev/null || true
stop_backstop
"$TARGET_DIR/release/examples/backend" "127.0.0.1:$BACKEND" --quiet &
PIDS+=($!)
config "$WORK/data" "$BACKEND" true "" >"$WORK/replay.toml"
start_backstop "$WORK/replay.toml"
DEPTH=$(queue | field '["depth"]')
START=$(date +%s.%N)
while (( $(queue | field '["depth"]') > 0 )); do sleep 0.1; done
END=$(date +%s.%N)
stop_backstop
python3 -c "d=$DEPTH; t=$END-$START; print(f'\nReplay: {d} records delivered in {t:.1f} s = {d/t:.0f} records/s (one route, in order)')"
