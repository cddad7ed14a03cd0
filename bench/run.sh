#!/usr/bin/env bash
# Backstop load benchmark: the backend directly, nginx, HAProxy and Backstop,
# side by side in one run, all on 127.0.0.1. See bench/README.md.
#
#   bench/run.sh                                  # 5 rounds x 10 s per target/scenario
#   BENCH_DURATION=3s BENCH_ROUNDS=1 bench/run.sh # quick check
#
# Environment (all optional):
#   BENCH_DURATION    wrk duration per run               (default 10s)
#   BENCH_ROUNDS      interleaved rounds                 (default 5)
#   BENCH_CONNECTIONS wrk connections                    (default 64)
#   BENCH_WARMUP      untimed warm-up per target/scenario before round 1, 0 to skip (default 2s)
#   BENCH_IDLE_CONNS  idle keep-alive connections for the memory test (default 1000)
#   BENCH_PORT_BASE   first of 10 consecutive ports on 127.0.0.1 (default 18080)
#   BENCH_PIN=1       pin wrk to CPU 0 and every server to CPU 1 (default: no pinning)
#   BENCH_NO_BUILD=1  skip the cargo build and use the binaries already in target/release
#   BENCH_PGO=1       also measure the profile-guided build (scripts/build-pgo.sh, built
#                     unless BENCH_NO_BUILD=1; target/pgo/release/backstop)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH="$PATH:/usr/sbin:/sbin"   # nginx and haproxy live in /usr/sbin

DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-5}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
WARMUP=${BENCH_WARMUP:-2s}
IDLE_CONNS=${BENCH_IDLE_CONNS:-1000}
PORT_BASE=${BENCH_PORT_BASE:-18080}

BACKEND_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
HAPROXY_PORT=$((PORT_BASE + 2))
BACKSTOP_PORT=$((PORT_BASE + 3))
BACKSTOP_ADMIN_PORT=$((PORT_BASE + 4))
BARE_PORT=$((PORT_BASE + 5))
POOL_PORT=$((PORT_BASE + 6))
NGINX_FWD_PORT=$((PORT_BASE + 7))
PGO_PORT=$((PORT_BASE + 8))
PGO_ADMIN_PORT=$((PORT_BASE + 9))

# `bare` is examples/bare_proxy.rs: hyper-util's server and client with no
# pipeline, the floor of what Backstop's libraries cost. `pool` is the same
# with `--own-pool`: a plain list of hyper http1 senders instead of
# hyper-util's legacy client, to show what that client costs.
# `nginx-fwd` is nginx (same process, a second server) setting the headers
# Backstop sets on every request: the cost of that work, for comparison.
# `backstop-pgo` is the same source built with profile-guided optimisation.
PGO=${BENCH_PGO:-0}
TARGETS=(direct nginx nginx-fwd haproxy bare pool backstop)
[[ $PGO == 1 ]] && TARGETS+=(backstop-pgo)
SCENARIOS=(small 16k)
declare -A PORT=([direct]=$BACKEND_PORT [nginx]=$NGINX_PORT [nginx-fwd]=$NGINX_FWD_PORT [haproxy]=$HAPROXY_PORT [bare]=$BARE_PORT [pool]=$POOL_PORT [backstop]=$BACKSTOP_PORT [backstop-pgo]=$PGO_PORT)
declare -A BODY_BYTES=([small]=13 [16k]=16384)

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Duration such as 10s, 2m, 500ms -> whole seconds (rounded up), for the time bounds.
seconds() {
    case $1 in
        *ms) echo $(( (${1%ms} + 999) / 1000 )) ;;
        *s) echo "${1%s}" ;;
        *m) echo $(( ${1%m} * 60 )) ;;
        *h) echo $(( ${1%h} * 3600 )) ;;
        *) echo "$1" ;;
    esac
}

# Pinning is off by default; when on, every server shares CPU 1 and wrk has CPU 0.
PIN_WRK=()
PIN_SRV=()
if [[ ${BENCH_PIN:-0} == 1 ]]; then
    PIN_WRK=(taskset -c 0)
    PIN_SRV=(taskset -c 1)
fi

# --- 1. tools ----------------------------------------------------------------
missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    SUDO=()
    [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
    log "installing ${missing[*]}"
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi
command -v python3 >/dev/null || die "python3 is required"

# --- 2. build ----------------------------------------------------------------
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    log "building Backstop (release)"
    (cd "$ROOT" && cargo build --release --bin backstop --example backend --example bare_proxy)
    if [[ $PGO == 1 ]]; then
        log "building Backstop with profile-guided optimisation"
        bash "$ROOT/scripts/build-pgo.sh"
    fi
fi
BACKSTOP_BIN=$TARGET_DIR/release/backstop
BACKEND_BIN=$TARGET_DIR/release/examples/backend
BARE_BIN=$TARGET_DIR/release/examples/bare_proxy
PGO_BIN=$TARGET_DIR/pgo/release/backstop
BINS=("$BACKSTOP_BIN" "$BACKEND_BIN" "$BARE_BIN")
[[ $PGO == 1 ]] && BINS+=("$PGO_BIN")
for bin in "${BINS[@]}"; do
    [[ -x $bin ]] || die "$bin is missing"
done

# --- 3. processes, temp dir, cleanup ------------------------------------------
TMP=$(mktemp -d -t backstop-bench.XXXXXX)
chmod 755 "$TMP"   # nginx workers (user nobody) need to reach their temp dirs
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1,000 idle connections plus the load: lift the descriptor limit for everything we start.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

for p in "$BACKEND_PORT" "$NGINX_PORT" "$NGINX_FWD_PORT" "$HAPROXY_PORT" "$BACKSTOP_PORT" "$BACKSTOP_ADMIN_PORT" "$BARE_PORT" "$POOL_PORT" "$PGO_PORT" "$PGO_ADMIN_PORT"; do
    # SO_REUSEADDR like the servers use, so TIME_WAIT leftovers from a previous run don't count.
    python3 -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()' "$p" 2>/dev/null \
        || die "port $p on 127.0.0.1 is in use (set BENCH_PORT_BASE to move them all)"
done

# start NAME CMD...: run CMD in the background, log to $TMP/NAME.log, pid in LAST_PID.
start() {
    local name=$1
    shift
    "${PIN_SRV[@]}" "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_ready NAME PID URL: until URL answers 2xx; fail if the process dies or 20 s pass.
wait_ready() {
    local name=$1 pid=$2 url=$3
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || { cat "$TMP/$name.log" >&2; die "$name exited during start"; }
        curl -sf -o /dev/null --max-time 1 "$url" && return 0
        sleep 0.1
    done
    cat "$TMP/$name.log" >&2
    die "$name not ready at $url after 20 s"
}

render() { # TEMPLATE OUTPUT PORT [ADMIN_PORT [DATA_DIR]]
    sed -e "s|@TMPDIR@/data|${5:-$TMP/data}|g" -e "s|@TMPDIR@|$TMP|g" -e "s|@PORT@|$3|g" \
        -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" -e "s|@ADMIN_PORT@|${4:-$BACKSTOP_ADMIN_PORT}|g" \
        -e "s|@FWD_PORT@|$NGINX_FWD_PORT|g" "$1" >"$2"
}

log "temp dir $TMP"
start backend "$BACKEND_BIN" "127.0.0.1:$BACKEND_PORT" --quiet
BACKEND_PID=$LAST_PID
wait_ready backend "$BACKEND_PID" "http://127.0.0.1:$BACKEND_PORT/bench/small"

mkdir -p "$TMP/nginx"
render "$BENCH_DIR/nginx.conf.tmpl" "$TMP/nginx/nginx.conf" "$NGINX_PORT"
start nginx nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
NGINX_PID=$LAST_PID
wait_ready nginx "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/health"

render "$BENCH_DIR/haproxy.cfg.tmpl" "$TMP/haproxy.cfg" "$HAPROXY_PORT"
start haproxy haproxy -db -f "$TMP/haproxy.cfg"
HAPROXY_PID=$LAST_PID
wait_ready haproxy "$HAPROXY_PID" "http://127.0.0.1:$HAPROXY_PORT/health"

mkdir -p "$TMP/data"
render "$BENCH_DIR/backstop.toml.tmpl" "$TMP/backstop.toml" "$BACKSTOP_PORT"
start backstop "$BACKSTOP_BIN" run -c "$TMP/backstop.toml"
BACKSTOP_PID=$LAST_PID
wait_ready backstop "$BACKSTOP_PID" "http://127.0.0.1:$BACKSTOP_PORT/health"

PGO_PID=
if [[ $PGO == 1 ]]; then
    mkdir -p "$TMP/data-pgo"
    render "$BENCH_DIR/backstop.toml.tmpl" "$TMP/backstop-pgo.toml" "$PGO_PORT" "$PGO_ADMIN_PORT" "$TMP/data-pgo"
    start backstop-pgo "$PGO_BIN" run -c "$TMP/backstop-pgo.toml"
    PGO_PID=$LAST_PID
    wait_ready backstop-pgo "$PGO_PID" "http://127.0.0.1:$PGO_PORT/health"
fi

start bare "$BARE_BIN" "127.0.0.1:$BARE_PORT" "127.0.0.1:$BACKEND_PORT"
BARE_PID=$LAST_PID
wait_ready bare "$BARE_PID" "http://127.0.0.1:$BARE_PORT/bench/small"

start pool "$BARE_BIN" "127.0.0.1:$POOL_PORT" "127.0.0.1:$BACKEND_PORT" --own-pool
POOL_PID=$LAST_PID
wait_ready pool "$POOL_PID" "http://127.0.0.1:$POOL_PORT/bench/small"

declare -A PID_OF=([direct]=$BACKEND_PID [nginx]=$NGINX_PID [nginx-fwd]=$NGINX_PID [haproxy]=$HAPROXY_PID [bare]=$BARE_PID [pool]=$POOL_PID [backstop]=$BACKSTOP_PID [backstop-pgo]=$PGO_PID)
declare -A RSS_ARGS=([nginx]="--with-children" [haproxy]="" [backstop]="")

# Every target must serve the same bodies before it is measured.
for t in "${TARGETS[@]}"; do
    for s in "${SCENARIOS[@]}"; do
        got=$(curl -sf --max-time 5 "http://127.0.0.1:${PORT[$t]}/bench/$s" | wc -c) \
            || die "$t: GET /bench/$s failed"
        [[ $got -eq ${BODY_BYTES[$s]} ]] || die "$t: GET /bench/$s gave $got bytes, want ${BODY_BYTES[$s]}"
    done
done
log "all targets up: backend :$BACKEND_PORT, nginx :$NGINX_PORT (+headers :$NGINX_FWD_PORT), haproxy :$HAPROXY_PORT, bare :$BARE_PORT, pool :$POOL_PORT, backstop :$BACKSTOP_PORT"

RESULTS=$TMP/results.log   # one key=value line per measurement, read by summarize.py
{
    echo "META date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "META duration=$DURATION rounds=$ROUNDS connections=$CONNECTIONS warmup=$WARMUP idle_conns=$IDLE_CONNS pin=${BENCH_PIN:-0} pgo=$PGO"
    echo "META cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1 | tr ' ' '_') cores=$(nproc) kernel=$(uname -r)"
    echo "META nginx=$(nginx -v 2>&1 | sed 's|.*nginx/||') haproxy=$(haproxy -v | head -1 | awk '{print $3}') wrk=$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "META backstop=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo uncommitted)$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo +dirty)"
} >"$RESULTS"

# --- 4. memory: idle, then with $IDLE_CONNS idle keep-alive connections --------
measure_rss() { # TARGET STATE [idle_conns.py args...]
    local t=$1 state=$2 out
    shift 2
    # shellcheck disable=SC2086
    out=$(timeout 120 python3 "$BENCH_DIR/idle_conns.py" --pid "${PID_OF[$t]}" ${RSS_ARGS[$t]} "$@")
    log "$t ($state): $(grep -v '^RSS_RESULT' <<<"$out")"
    echo "RSS target=$t state=$state $(grep '^RSS_RESULT' <<<"$out" | sed 's/^RSS_RESULT //')" >>"$RESULTS"
}
for t in nginx haproxy backstop; do
    measure_rss "$t" idle --connections 0 --settle 0
done
for t in nginx haproxy backstop; do
    measure_rss "$t" conns --port "${PORT[$t]}" --connections "$IDLE_CONNS"
    sleep 1
done
# Then twice as many: a second batch opened while the first has been idle
# for about 10 s. What a proxy keeps for a connection that stays idle shows
# here (Backstop lets go of an idle connection's buffers after 2.5–5 s, and
# the second batch reuses them).
for t in nginx haproxy backstop; do
    # shellcheck disable=SC2086
    timeout 120 python3 "$BENCH_DIR/idle_conns.py" --pid "${PID_OF[$t]}" ${RSS_ARGS[$t]} \
        --port "${PORT[$t]}" --connections "$IDLE_CONNS" --settle 16 >/dev/null &
    first_batch=$!
    sleep 10
    measure_rss "$t" twice --port "${PORT[$t]}" --connections "$IDLE_CONNS" --settle 1
    wait "$first_batch" || die "the first batch of idle connections to $t failed"
    sleep 1
done

# --- 5. load: interleaved rounds of wrk ----------------------------------------
WRK_LIMIT=$(( $(seconds "$DURATION") + 30 ))
run_wrk() { # DURATION URL
    timeout "$WRK_LIMIT" "${PIN_WRK[@]}" wrk -t1 -c"$CONNECTIONS" -d"$1" --latency \
        -s "$BENCH_DIR/wrk-report.lua" "$2"
}

if [[ $WARMUP != 0 ]]; then
    log "warm-up: $WARMUP per target and scenario"
    for s in "${SCENARIOS[@]}"; do
        for t in "${TARGETS[@]}"; do
            run_wrk "$WARMUP" "http://127.0.0.1:${PORT[$t]}/bench/$s" >/dev/null
        done
    done
fi

# Sums what READER prints for each PID and each of its children still running
# (nginx's worker), given the process's /proc directory; a process gone in
# between counts 0.
sum_over_processes() { # READER PID...
    local reader=$1 total=0 pid dir value
    shift
    for pid in "$@"; do
        for dir in /proc/"$pid" $(pgrep -P "$pid" | sed 's|^|/proc/|'); do
            value=$("$reader" "$dir" 2>/dev/null)
            total=$((total + ${value:-0}))
        done
    done
    echo "$total"
}

# CPU time (user + system, clock ticks): fields 14 and 15 of stat, counted
# after the ")" that ends the name.
cpu_ticks_in() { sed 's/.*) //' "$1/stat" | awk '{print $12 + $13}'; }
cpu_ticks() { sum_over_processes cpu_ticks_in "$@"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# How often the kernel took the CPU from a process while it could still run:
# pinned, mostly the backend on the proxy's core, woken and run at once. It goes
# with how many requests the backend answers per turn, and so with the spread of
# latency (see bench/RESULTS.md, section 1u).
preemptions_in() { awk '/^nonvoluntary_ctxt_switches/{print $2}' "$1/status"; }
preemptions() { sum_over_processes preemptions_in "$@"; }

mkdir -p "$TMP/wrk"
for r in $(seq "$ROUNDS"); do
    for s in "${SCENARIOS[@]}"; do
        for t in "${TARGETS[@]}"; do
            out=$TMP/wrk/$r-$s-$t.txt
            proxy_before=$(cpu_ticks "${PID_OF[$t]}")
            backend_before=$(cpu_ticks "$BACKEND_PID")
            preempted_before=$(preemptions "${PID_OF[$t]}")
            run_wrk "$DURATION" "http://127.0.0.1:${PORT[$t]}/bench/$s" >"$out" 2>&1 \
                || { cat "$out" >&2; die "wrk failed for $t /bench/$s"; }
            proxy_cpu=$(( ($(cpu_ticks "${PID_OF[$t]}") - proxy_before) * TICK_US ))
            backend_cpu=$(( ($(cpu_ticks "$BACKEND_PID") - backend_before) * TICK_US ))
            preempted=$(( $(preemptions "${PID_OF[$t]}") - preempted_before ))
            line=$(grep '^BENCH_RESULT' "$out") || { cat "$out" >&2; die "no result from wrk"; }
            echo "WRK round=$r scenario=$s target=$t ${line#BENCH_RESULT } cpu_us=$proxy_cpu backend_cpu_us=$backend_cpu preempted=$preempted" >>"$RESULTS"
            log "round $r/$ROUNDS $s $t: $(awk '/Requests\/sec/{print $2 " req/s"}' "$out")"
            sleep 1
        done
    done
done

# Peak resident memory over the whole run (start, idle connections and load).
for t in nginx haproxy backstop; do
    measure_rss "$t" peak --connections 0 --settle 0 --field VmHWM
done

# --- 6. report ------------------------------------------------------------------
REPORT=$BENCH_DIR/results-$(date +%F).md
[[ -e $REPORT ]] && REPORT=$BENCH_DIR/results-$(date +%F-%H%M%S).md
python3 "$BENCH_DIR/summarize.py" "$RESULTS" >"$REPORT"
echo
cat "$REPORT"
log "written to ${REPORT#"$ROOT"/}"
