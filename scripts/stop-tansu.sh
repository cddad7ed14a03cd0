#!/usr/bin/env bash
# Usage: stop-tansu.sh [PORT] [DATA_DIR] [--keep-store]
#        stop-tansu.sh --pid PID
# Stops the broker started by start-tansu.sh with the same PORT/DATA_DIR, and
# its S3 emulator (TANSU_STORAGE=s3) unless --keep-store is given: keep it to
# restart the broker on the same data. Succeeds if nothing is running.
set -euo pipefail

KEEP_STORE=0
PIDS=()
ARGS=()
while (($#)); do
    case "$1" in
        --keep-store) KEEP_STORE=1 ;;
        --pid) PIDS+=("$2"); shift ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done
PORT="${ARGS[0]:-9092}"
DIR="${ARGS[1]:-/tmp/tansu-$PORT}"

# TERM, then KILL after 10 s (Tansu takes ~1.5 s to exit on TERM).
stop_pid() {
    local pid="$1" name="$2"
    kill -0 "$pid" 2>/dev/null || return 0
    # Guard against a recycled PID belonging to something else.
    grep -qa -- "$name" "/proc/$pid/cmdline" || { echo "stop-tansu: pid $pid is not $name; leaving it" >&2; return 0; }
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "stop-tansu: pid $pid ignored SIGTERM; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

if ((${#PIDS[@]})); then
    for pid in "${PIDS[@]}"; do stop_pid "$pid" tansu; done
    exit 0
fi

if [[ -f "$DIR/tansu.pid" ]]; then
    stop_pid "$(cat "$DIR/tansu.pid")" tansu
    rm -f "$DIR/tansu.pid"
fi
if ((!KEEP_STORE)) && [[ -f "$DIR/s3.pid" ]]; then
    stop_pid "$(cat "$DIR/s3.pid")" moto.server
    rm -f "$DIR/s3.pid" "$DIR/s3.port"
fi
