#!/usr/bin/env bash
# Set up .venv and run the embedded stack on the sample data: Redis, a retrain worker, the ML backend
# (http://127.0.0.1:9090) and Label Studio (http://127.0.0.1:8080, installed into .ls-venv on the first
# run). The first run trains the first model through the worker. Extra arguments go to
# `defect-assist stack` (e.g. --no-label-studio, --port, --label-studio-port, --smoke to exit after the
# start-up check).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/defect-assist stack "$@"
