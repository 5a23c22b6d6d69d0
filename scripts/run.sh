#!/usr/bin/env bash
# Set up .venv and run the embedded stack on the sample data: Redis, a retrain worker, the ML backend
# (http://127.0.0.1:9090) and Label Studio (http://127.0.0.1:8080) when .ls-venv is set up.
# The first run trains the first model through the worker. Extra arguments go to `defect-assist stack`
# (e.g. --label-studio to install and run Label Studio, --smoke to exit after the start-up check).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/defect-assist stack "$@"
