#!/usr/bin/env bash
# Runs Backstop's whole test suite on a fresh machine: installs and starts
# what the tests need (Redis, headless Chromium + chromedriver, the Tansu
# Kafka-protocol broker and its Python client), then
# `cargo test --all-features` (every optional part, such as the OTLP
# exporter, is built and tested). Tests that need a service fail (never
# skip) without it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Redis: the machine's server on 127.0.0.1:6379; start one if none answers.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server redis-tools
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 \
    || { echo "test.sh: Redis does not answer on 127.0.0.1:6379" >&2; exit 1; }

# Headless Chromium and chromedriver for the dashboard tests (tests/it/dashboards.rs).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi

# Tansu (started per test by tests/it/kafka.rs through scripts/start-tansu.sh)
# and the Python Kafka client the tests read topics with.
bash scripts/install-tansu.sh >/dev/null

cargo test --all-features "$@"
