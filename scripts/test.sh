#!/usr/bin/env bash
# Set up everything the tests need and run them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# System programs the end-to-end tests drive (as root on Debian; skipped otherwise):
# a real redis-server, headless Chromium for screenshots.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for package in redis-server chromium; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test: apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

mkdir -p artifacts
set +e
.venv/bin/python -m pytest -p no:cacheprovider --durations=15 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests — treating as a failure" >&2
  exit 1
fi
exit "$status"
