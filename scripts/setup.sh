#!/usr/bin/env bash
# Create or update the project's virtual environment at .venv/ (idempotent).
#   bash scripts/setup.sh            # the project with every extra (server, worker, explore, dev)
#   SETUP_EXTRAS=server,worker bash scripts/setup.sh
# Needs only Python 3.11; as root on Debian it installs what is missing with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${SETUP_EXTRAS:-all}"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
[ -n "$python_bin" ] || { echo "setup: Python 3.11 not found" >&2; exit 1; }
"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "setup: need Python 3.11, $python_bin is $("$python_bin" --version)" >&2; exit 1; }

apt_install() {  # apt_install PACKAGE... (only as root, only what is missing)
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 0
  local missing=()
  for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Debian's python3 lacks venv/ensurepip until python3-venv is installed.
if ! "$python_bin" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_install python3-venv python3-pip
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi

stamp=.venv/.defect-assist-setup
wanted="$(sha256sum pyproject.toml | cut -c1-16) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing defect-assist[$extras] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$wanted" > "$stamp"
fi
.venv/bin/defect-assist --help >/dev/null
echo "setup: .venv ready ($(.venv/bin/python --version))"
