#!/usr/bin/env bash
# What the OTLP trace exporter costs: the same plain route, measured with wrk
# on four Backstop processes, interleaved, on 127.0.0.1:
#
#   plain   a build without the `otlp` feature
#   off     a build with it, `[otlp]` absent (enabled = false)
#   ratio0  enabled, sample_ratio = 0 (a span is started and dropped per request)
#   all     enabled, every request exported (2 spans) to a sink collector
#
# The sink is a small Python HTTP server that reads each export and answers
# 200. Each Backstop has one worker thread (as in bench/run.sh), so under
# wrk's load it is CPU-bound and req/s follows its CPU cost per request,
# which is reported too (from /proc).
#
#   bench/otlp.sh                                 # 5 rounds x 10 s
#   BENCH_DURATION=3s BENCH_ROUNDS=1 bench/otlp.sh
#
# Environment: BENCH_DURATION (10s), BENCH_ROUNDS (5), BENCH_CONNECTIONS (64),
# BENCH_PORT_BASE (first of 10 consecutive ports, default 18180),
# BENCH_NO_BUILD=1 (use target/release/otlp-bench/ as left by a previous run).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN_DIR=$TARGET_DIR/release/otlp-bench
DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-5}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
BASE=${BENCH_PORT_BASE:-18180}
CONFIGS=(plain off ratio0 all)

log() { printf '[otlp-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
command -v wrk >/dev/null || die "wrk is required (apt-get install wrk)"

if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    mkdir -p "$BIN_DIR"
    log "building Backstop without the otlp feature (release)"
    (cd "$ROOT" && cargo build --release --bin backstop --example backend)
    cp "$TARGET_DIR/release/backstop" "$BIN_DIR/backstop-plain"
    cp "$TARGET_DIR/release/examples/backend" "$BIN_DIR/backend"
    log "building Backstop with --features otlp (release)"
    (cd "$ROOT" && cargo build --release --features otlp --bin backstop)
    cp "$TARGET_DIR/release/backstop" "$BIN_DIR/backstop-otlp"
fi
for bin in backstop-plain backstop-otlp backend; do
    [[ -x $BIN_DIR/$bin ]] || die "$BIN_DIR/$bin is missing"
done

BACKEND_PORT=$BASE
SINK_PORT=$((BASE + 9))
declare -A PORT ADMIN BIN PID
i=1
for c in "${CONFIGS[@]}"; do
    PORT[$c]=$((BASE + i))
    ADMIN[$c]=$((BASE + 4 + i))
    i=$((i + 1))
done
BIN=([plain]=backstop-plain [off]=backstop-otlp [ratio0]=backstop-otlp [all]=backstop-otlp)
for p in $(seq "$BASE" $((BASE + 9))); do
    ss -ltn | grep -q "127.0.0.1:$p " && die "port $p on 127.0.0.1 is in use (set BENCH_PORT_BASE)"
done

TMP=$(mktemp -d -t backstop-otlp-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$TMP/sink.py" <<'EOF'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
EOF

"$BIN_DIR/backend" "127.0.0.1:$BACKEND_PORT" --quiet >"$TMP/backend.log" 2>&1 &
PIDS+=($!)
python3 "$TMP/sink.py" "$SINK_PORT" >"$TMP/sink.log" 2>&1 &
PIDS+=($!)

for c in "${CONFIGS[@]}"; do
    case $c in
        ratio0) otlp=$'[otlp]\nenabled = true\nsample_ratio = 0\nendpoint = "http://127.0.0.1:'$SINK_PORT$'/v1/traces"' ;;
        all) otlp=$'[otlp]\nenabled = true\nsample_ratio = 1.0\nendpoint = "http://127.0.0.1:'$SINK_PORT$'/v1/traces"' ;;
        *) otlp="" ;;
    esac
    # bench/run.sh's Backstop config, each with its own ports and data dir,
    # plus the [otlp] table of this configuration.
    mkdir -p "$TMP/$c"
    sed -e "s|@TMPDIR@|$TMP/$c|g" -e "s|@PORT@|${PORT[$c]}|g" -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" \
        -e "s|@ADMIN_PORT@|${ADMIN[$c]}|g" "$BENCH_DIR/backstop.toml.tmpl" >"$TMP/$c.toml"
    printf '\n%s\n' "$otlp" >>"$TMP/$c.toml"
    "$BIN_DIR/${BIN[$c]}" run -c "$TMP/$c.toml" >"$TMP/$c.log" 2>&1 &
    PID[$c]=$!
    PIDS+=($!)
done

for c in "${CONFIGS[@]}"; do
    for _ in $(seq 200); do
        curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:${PORT[$c]}/bench/small" && break
        kill -0 "${PID[$c]}" 2>/dev/null || { cat "$TMP/$c.log" >&2; die "$c exited during start"; }
        sleep 0.1
    done
    curl -sf -o /dev/null "http://127.0.0.1:${PORT[$c]}/bench/small" || die "$c does not answer"
done
log "up: backend :$BACKEND_PORT, sink :$SINK_PORT, plain :${PORT[plain]}, off :${PORT[off]}, ratio0 :${PORT[ratio0]}, all :${PORT[all]}"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
for c in "${CONFIGS[@]}"; do
    wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:${PORT[$c]}/bench/small" >/dev/null
done
RESULTS=$TMP/results.log
for r in $(seq "$ROUNDS"); do
    for c in "${CONFIGS[@]}"; do
        before=$(ticks "${PID[$c]}")
        line=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$BENCH_DIR/wrk-report.lua" \
            "http://127.0.0.1:${PORT[$c]}/bench/small" | grep '^BENCH_RESULT') || die "wrk failed for $c"
        cpu_us=$(( ($(ticks "${PID[$c]}") - before) * TICK_US ))
        echo "round=$r config=$c cpu_us=$cpu_us ${line#BENCH_RESULT }" | tee -a "$RESULTS" >&2
        sleep 1
    done
done
sleep 6   # a last export or two
for c in ratio0 all; do
    echo "METRICS config=$c $(curl -s "http://127.0.0.1:${ADMIN[$c]}/metrics" | grep '^backstop_otlp_spans' | tr '\n' ' ')" >>"$RESULTS"
done

python3 - "$RESULTS" <<'EOF'
import re, statistics, sys

rows, metrics = {}, []
for line in open(sys.argv[1]):
    if line.startswith("METRICS"):
        metrics.append(line.strip())
        continue
    f = dict(kv.split("=", 1) for kv in line.split())
    rows.setdefault(f["config"], []).append(f)
base = statistics.median(float(f["rps"]) for f in rows["plain"])
print("| config | req/s (median) | vs plain | CPU µs/request (median) | p50 µs | p99 µs | req/s per round |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for c, fs in rows.items():
    rps = statistics.median(float(f["rps"]) for f in fs)
    cpu = statistics.median(int(f["cpu_us"]) / int(f["requests"]) for f in fs)
    p50 = statistics.median(int(f["p50_us"]) for f in fs)
    p99 = statistics.median(int(f["p99_us"]) for f in fs)
    runs = ", ".join(str(round(float(f["rps"]))) for f in fs)
    print(f"| {c} | {rps:.0f} | {rps / base:.2f}× | {cpu:.1f} | {p50:.0f} | {p99:.0f} | {runs} |")
print()
for m in metrics:
    print(f"- `{m}`")
EOF
