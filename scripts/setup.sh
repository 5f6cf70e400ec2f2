#!/usr/bin/env bash
# Create .venv (if needed) and install vel with its development tools into it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v -e '^WARNING: Location' -e 'is ignored' >&2 || true
.venv/bin/python -c 'import vel, redis, asyncpg, openai, pytest, fakeredis' \
  || { echo "setup: install failed" >&2; exit 1; }
