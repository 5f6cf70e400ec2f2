#!/usr/bin/env bash
# Create .venv (if needed) and install vel with its development tools into it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The distribution was called `vel` before it became `vel-memory` (same import package): drop a
# stale editable install of the old name, or two distributions would claim `vel`.
if .venv/bin/python -m pip show -q vel >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -y -q vel >/dev/null 2>&1 || true
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v -e '^WARNING: Location' -e 'is ignored' >&2 || true
.venv/bin/python -c 'import vel, redis, asyncpg, openai, pytest, fakeredis' \
  || { echo "setup: install failed" >&2; exit 1; }
