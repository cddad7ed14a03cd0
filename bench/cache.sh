#!/usr/bin/env bash
# Cache HIT benchmark: Backstop (memory store, Redis store) against nginx
# proxy_cache, for the same request, in the same run, on 127.0.0.1.
#
#   bench/cache.sh                                   # 3 rounds x 10 s per target/scenario
#   BENCH_DURATION=3s BENCH_ROUNDS=1 bench/cache.sh  # quick check
#
# Every server gets one worker (nginx worker_processes 1, Backstop workers = 1);
# wrk -t1 -c64 with keep-alive. Each target is checked to answer HITs before
# it is measured. The machine may be shared: numbers are indicative.
#
# Environment (all optional):
#   BENCH_DURATION   wrk duration per run                       (default 10s)
#   BENCH_ROUNDS     interleaved rounds                         (default 3)
#   BENCH_CONNECTIONS wrk connections                           (default 64)
#   BENCH_PORT_BASE  first of 5 consecutive ports               (default 18280)
#   BENCH_REDIS_URL  Redis for the Redis-store target           (default redis://127.0.0.1:6379)
#   BENCH_NO_BUILD=1 use the binaries already in target/release
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH="$PATH:/usr/sbin:/sbin"

DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
PORT_BASE=${BENCH_PORT_BASE:-18280}
REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}

BACKEND_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
MEMORY_PORT=$((PORT_BASE + 2))
REDIS_PORT=$((PORT_BASE + 3))
ADMIN_PORT=$((PORT_BASE + 4))

TARGETS=(nginx backstop-memory backstop-redis)
SCENARIOS=(small 16k)
declare -A PORT=([nginx]=$NGINX_PORT [backstop-memory]=$MEMORY_PORT [backstop-redis]=$REDIS_PORT)

log() { printf '[cache-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

missing=()
command -v nginx >/dev/null || missing+=(nginx)
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

if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    log "building release binaries (minutes on a small machine)"
    (cd "$ROOT" && cargo build --release --bin backstop --example backend)
fi
BACKSTOP=$TARGET_DIR/release/backstop
BACKEND=$TARGET_DIR/release/examples/backend
[[ -x $BACKSTOP && -x $BACKEND ]] || die "release binaries missing in $TARGET_DIR/release"

TMP=$(mktemp -d /tmp/backstop-cache-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listening on port $1"
}

# --- servers -------------------------------------------------------------------
"$BACKEND" "127.0.0.1:$BACKEND_PORT" --quiet &
PIDS+=($!)
wait_port "$BACKEND_PORT"

mkdir -p "$TMP/nginx/cache"
# nginx workers run as an unprivileged user when started as root: they must
# be able to write the cache files.
chmod 755 "$TMP"
chmod -R 777 "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path       $TMP/nginx/proxy;
    fastcgi_temp_path     $TMP/nginx/fastcgi;
    uwsgi_temp_path       $TMP/nginx/uwsgi;
    scgi_temp_path        $TMP/nginx/scgi;
    keepalive_requests 1000000;
    proxy_cache_path $TMP/nginx/cache levels=1:2 keys_zone=bench:10m max_size=100m inactive=10m use_temp_path=off;
    upstream bench_backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_valid 200 10m;
            proxy_cache_lock on;
            add_header X-Cache \$upstream_cache_status;
        }
    }
}
EOF
nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" &
PIDS+=($!)
wait_port "$NGINX_PORT"

backstop_config() { # port admin_port store extra
    cat <<EOF
$4
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
data_dir = "$TMP/data-$1"
workers = 1

[log]
level = "warn"

[replay]
enabled = false

[[routes]]
name = "bench"
path_prefix = "/bench"
upstreams = ["http://127.0.0.1:$BACKEND_PORT"]
  [routes.retry]
  max_attempts = 1
  [routes.capture]
  enabled = false
  [routes.cache]
  enabled = true
  ttl = "10m"
  store = "$3"
EOF
}
backstop_config "$MEMORY_PORT" "$ADMIN_PORT" memory "" >"$TMP/memory.toml"
backstop_config "$REDIS_PORT" "$((ADMIN_PORT + 100))" redis \
    "[redis]
url = \"$REDIS_URL\"
key_prefix = \"bench-$$:\"
timeout = \"100ms\"" >"$TMP/redis.toml"
"$BACKSTOP" run -c "$TMP/memory.toml" 2>"$TMP/memory.log" &
PIDS+=($!)
"$BACKSTOP" run -c "$TMP/redis.toml" 2>"$TMP/redis.log" &
PIDS+=($!)
wait_port "$MEMORY_PORT"
wait_port "$REDIS_PORT"

# --- every target must answer HITs before it is measured ------------------------
for target in "${TARGETS[@]}"; do
    for scenario in "${SCENARIOS[@]}"; do
        url="http://127.0.0.1:${PORT[$target]}/bench/$scenario"
        curl -s -o /dev/null "$url"
        sleep 0.2
        status=$(curl -s -o /dev/null -D - "$url" | tr -d '\r' | awk 'tolower($1)=="x-cache:" {print $2}')
        if [[ $status != HIT ]]; then
            curl -s -o /dev/null -D - "$url" >&2 || true
            tail -5 "$TMP"/nginx/error.log "$TMP"/*.log >&2 2>/dev/null || true
            die "$target $scenario: X-Cache is '$status', not HIT"
        fi
    done
done
log "all targets answer HITs; measuring $ROUNDS round(s) of $DURATION each"

# --- measure ---------------------------------------------------------------------
RESULTS=$TMP/results.txt
: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    for scenario in "${SCENARIOS[@]}"; do
        for target in "${TARGETS[@]}"; do
            url="http://127.0.0.1:${PORT[$target]}/bench/$scenario"
            line=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$BENCH_DIR/wrk-report.lua" "$url" |
                grep '^BENCH_RESULT')
            log "round $round $scenario $target: $line"
            echo "$scenario $target $line" >>"$RESULTS"
        done
    done
done

python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    scenario, target, _, *fields = line.split()
    kv = dict(f.split("=") for f in fields)
    r = rows.setdefault((scenario, target), {"rps": [], "p99": [], "err": 0})
    r["rps"].append(float(kv["rps"]))
    r["p99"].append(int(kv["p99_us"]))
    r["err"] += sum(int(v) for k, v in kv.items() if k.startswith("err_"))
print("| scenario | target | HIT req/s (median) | p99 ms (median) | vs nginx | errors |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for scenario in ("small", "16k"):
    base = statistics.median(rows[(scenario, "nginx")]["rps"])
    for target in ("nginx", "backstop-memory", "backstop-redis"):
        r = rows[(scenario, target)]
        rps = statistics.median(r["rps"])
        p99 = statistics.median(r["p99"]) / 1000
        print(f"| {scenario} | {target} | {rps:,.0f} | {p99:.2f} | {rps / base:.2f}x | {r['err']} |")
EOF
