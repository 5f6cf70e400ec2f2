#!/usr/bin/env bash
# Create .venv (if needed) and install vel with its development tools into it.
# --all-pythons: also .venv312 and .venv313 (Python 3.12 and 3.13), where scripts/test runs
# the contract, spec-snippet and lifecycle tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter for Python $1 (e.g. 3.12): on PATH, else a pyenv installation.
find_python() {
  local version=$1 candidate
  if command -v "python$version" >/dev/null 2>&1 && "python$version" -c '' >/dev/null 2>&1; then
    command -v "python$version"
    return
  fi
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/"python$version"; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

# Install vel[dev] into the venv $1 (made with interpreter $2 if missing).
install_into() {
  local venv=$1 python=$2
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  # The distribution was called `vel` before it became `vel-memory` (same import package):
  # drop a stale editable install of the old name, or two distributions would claim `vel`.
  if "$venv/bin/python" -m pip show -q vel >/dev/null 2>&1; then
    "$venv/bin/python" -m pip uninstall -y -q vel >/dev/null 2>&1 || true
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'is ignored' >&2 || true
  "$venv/bin/python" -c 'import vel, redis, asyncpg, openai, pytest, fakeredis' \
    || { echo "setup: install into $venv failed" >&2; exit 1; }
}

install_into .venv python3
if [ "${1:-}" = "--all-pythons" ]; then
  for version in 3.12 3.13; do
    python=$(find_python "$version") \
      || { echo "setup: Python $version not found (on PATH or in pyenv)" >&2; exit 1; }
    install_into ".venv${version/./}" "$python"
  done
fi
