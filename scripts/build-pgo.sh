#!/usr/bin/env bash
# Builds Backstop with profile-guided optimisation (PGO): an instrumented
# build serves a short training load on 127.0.0.1, and the release build is
# then compiled with the counts it recorded, so the compiler lays out the
# code a request runs together and inlines by what is actually hot. Same
# source and features as `cargo build --release`; only the code layout and
# inlining differ (bench/RESULTS.md section 1l has what it changes).
#
#   scripts/build-pgo.sh        # -> target/pgo/release/backstop
#
# Needs wrk, curl and llvm-profdata 19 or newer (rustup's llvm-tools, or
# Debian's llvm-19); whichever is missing is installed with apt-get.
#
# Environment (all optional):
#   PGO_PORT_BASE   first of 3 consecutive ports on 127.0.0.1 (default 18180)
#   PGO_SECONDS     seconds of each training load              (default 5)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PORT_BASE=${PGO_PORT_BASE:-18180}
SECONDS_EACH=${PGO_SECONDS:-5}
BACKEND_PORT=$PORT_BASE
PROXY_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))
# Kept apart from target/release, so neither build undoes the other.
GEN_DIR=$TARGET_DIR/pgo-gen
USE_DIR=$TARGET_DIR/pgo
PROFILES=$TARGET_DIR/pgo-profiles

log() { printf '[pgo] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# apt-get install PACKAGE... (as root, or through sudo), after one update.
apt_install() {
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    log "installing $*"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# --- 1. tools ----------------------------------------------------------------
# llvm-profdata must read the raw profiles of rustc's LLVM: version 19 or
# newer reads those of the LLVM versions rustc has shipped since (checked
# with rustc 1.95 / LLVM 22).
find_profdata() {
    local sysroot candidate
    sysroot=$(rustc --print sysroot)
    for candidate in "$sysroot"/lib/rustlib/*/bin/llvm-profdata; do
        [[ -x $candidate ]] && { echo "$candidate"; return 0; }
    done
    for candidate in $(ls -d /usr/lib/llvm-*/bin/llvm-profdata 2>/dev/null | sort -t- -k2 -n -r); do
        local major=${candidate#/usr/lib/llvm-}
        major=${major%%/*}
        ((major >= 19)) && { echo "$candidate"; return 0; }
    done
    return 1
}
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
find_profdata >/dev/null || missing+=(llvm-19)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"
PROFDATA=$(find_profdata) || die "no llvm-profdata 19 or newer found"
log "using $PROFDATA"

# --- 2. instrumented build -----------------------------------------------------
rm -rf "$PROFILES"
mkdir -p "$PROFILES"
log "building the instrumented binary"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$PROFILES/raw" \
    cargo build --release --bin backstop --target-dir "$GEN_DIR")
(cd "$ROOT" && cargo build --release --example backend)

# --- 3. training load ------------------------------------------------------------
TMP=$(mktemp -d -t backstop-pgo.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

wait_ready() { # PID URL
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || die "a training process exited during start"
        curl -sf -o /dev/null --max-time 1 "$2" && return 0
        sleep 0.1
    done
    die "not ready at $2"
}

# Two kinds of route: the benchmark's (it streams; retries and capture off)
# and one with every default (retries and capture on, so bodies are buffered).
sed -e "s|@TMPDIR@|$TMP|g" -e "s|@PORT@|$PROXY_PORT|g" -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" \
    -e "s|@ADMIN_PORT@|$ADMIN_PORT|g" "$ROOT/bench/backstop.toml.tmpl" >"$TMP/backstop.toml"
cat >>"$TMP/backstop.toml" <<EOF

[[routes]]
name = "api"
path_prefix = "/api"
strip_prefix = true
upstreams = ["http://127.0.0.1:$BACKEND_PORT"]
EOF
cat >"$TMP/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"order":42,"items":["a","b"],"note":"profile training"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Request-Id"] = "training"
EOF

"$TARGET_DIR/release/examples/backend" "127.0.0.1:$BACKEND_PORT" --quiet >"$TMP/backend.log" 2>&1 &
PIDS+=($!)
wait_ready "$!" "http://127.0.0.1:$BACKEND_PORT/bench/small"
"$GEN_DIR/release/backstop" run -c "$TMP/backstop.toml" >"$TMP/backstop.log" 2>&1 &
PROXY_PID=$!
wait_ready "$PROXY_PID" "http://127.0.0.1:$PROXY_PORT/health"

train() { # what, wrk arguments...
    log "training: $1"
    shift
    timeout $((SECONDS_EACH + 30)) wrk -t1 -c64 -d"${SECONDS_EACH}s" "$@" >/dev/null
}
base=http://127.0.0.1:$PROXY_PORT
train "GET, 13 B answer (streaming route)" "$base/bench/small"
train "GET, 16 KiB answer (streaming route)" "$base/bench/16k"
train "GET with a query (default route)" "$base/api/items?page=2&sort=name"
train "POST with a JSON body (default route)" -s "$TMP/post.lua" "$base/api/orders"
train "no route (404)" "$base/nowhere"
curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_PORT/metrics"

# The profile is written when the process exits.
kill -TERM "$PROXY_PID"
wait "$PROXY_PID" || die "the instrumented proxy did not exit cleanly"
"$PROFDATA" merge -o "$PROFILES/backstop.profdata" "$PROFILES"/raw/*.profraw

# --- 4. optimised build ------------------------------------------------------------
log "building with the profile"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$PROFILES/backstop.profdata" \
    cargo build --release --bin backstop --target-dir "$USE_DIR")
log "built $USE_DIR/release/backstop"
