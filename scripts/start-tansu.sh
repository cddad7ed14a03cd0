#!/usr/bin/env bash
# Usage: start-tansu.sh [PORT] [DATA_DIR]
# Starts a Tansu (Kafka-protocol) broker on 127.0.0.1:PORT (default 9092) in the
# background, waits until a real Kafka client can use it, and prints its PID as
# the only line on stdout. DATA_DIR (default /tmp/tansu-PORT) holds tansu.log
# and tansu.pid.
#
# TANSU_STORAGE=memory (default): topics live inside the broker process and are
#   lost when it stops.
# TANSU_STORAGE=s3: topics, messages and committed offsets survive a broker
#   restart. This Tansu build only has the memory:// and s3:// engines (no
#   file/sqlite one), so the data goes to a local S3 emulator (moto) that this
#   script starts once per DATA_DIR and reuses on later starts; stop-tansu.sh
#   stops it too unless given --keep-store.
set -euo pipefail

PORT="${1:-9092}"
DIR="${2:-/tmp/tansu-$PORT}"
PY="${PYTHON:-python3}"
TANSU="${TANSU_BIN:-tansu}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG="$DIR/tansu.log"
mkdir -p "$DIR"

die() { echo "start-tansu: $*" >&2; [[ -f "$LOG" ]] && tail -n 20 "$LOG" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

command -v "$TANSU" >/dev/null || die "'$TANSU' not found; run scripts/install-tansu.sh"
alive "$DIR/tansu.pid" && die "a broker from $DIR is already running (pid $(cat "$DIR/tansu.pid"))"
# Tansu does not fail on a busy port: it panics in a worker thread and exits 0.
port_open "$PORT" && die "127.0.0.1:$PORT is already in use"

ENGINE="memory://tansu/"
if [[ "${TANSU_STORAGE:-memory}" == s3 ]]; then
    if ! alive "$DIR/s3.pid"; then
        S3_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >>"$DIR/s3.log" 2>&1 </dev/null &
        echo $! >"$DIR/s3.pid"
        echo "$S3_PORT" >"$DIR/s3.port"
        # Wait for moto and create the bucket (PUT /tansu); Tansu does not create it.
        "$PY" - "$S3_PORT" "$(cat "$DIR/s3.pid")" <<'EOF' || die "S3 emulator did not start; see $DIR/s3.log"
import os, sys, time, urllib.request as u
for _ in range(200):
    os.kill(int(sys.argv[2]), 0)  # raises (exit 1) if moto died
    try:
        u.urlopen(u.Request(f"http://127.0.0.1:{sys.argv[1]}/tansu", method="PUT"), timeout=1)
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
EOF
    fi
    S3_PORT="$(cat "$DIR/s3.port")"
    # object_store reads these; moto accepts any credentials.
    export AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true \
        AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
    ENGINE="s3://tansu/"
fi

# The advertised URL must match, or clients get redirected to the default localhost:9092.
# stdio is redirected so callers capturing our output (e.g. Command::output) do not hang.
# NO_COLOR keeps ANSI escapes out of the log file.
NO_COLOR=1 "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine "$ENGINE" >>"$LOG" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$DIR/tansu.pid"

deadline=$((SECONDS + 30))
while ((SECONDS < deadline)); do
    kill -0 "$PID" 2>/dev/null || die "tansu (pid $PID) exited during startup; log: $LOG"
    if port_open "$PORT" && "$PY" "$HERE/kafka_tool.py" list-topics --brokers "127.0.0.1:$PORT" --timeout 2 >/dev/null 2>&1; then
        echo "start-tansu: broker ready on 127.0.0.1:$PORT ($ENGINE), log: $LOG" >&2
        echo "$PID"
        exit 0
    fi
    sleep 0.2
done
kill "$PID" 2>/dev/null || true
die "tansu did not become ready within 30s; log: $LOG"
