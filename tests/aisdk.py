"""The AI SDK's own client (the `ai` npm package) for tests: installed from tests/js's lockfile."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

JS = Path(__file__).resolve().parent / "js"
PACKAGES = {"ai5": 5, "ai6": 6}  # npm alias (tests/js/package.json) -> `ai` major version


def install() -> dict[str, str]:
    """``npm ci`` in tests/js unless done for this lockfile; return alias -> `ai` version.

    Raises:
        RuntimeError: Node.js or npm is missing.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("Node.js 18+ with npm is needed to run the AI SDK's client (tests/js)")
    digest = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    stamp = JS / "node_modules" / ".vel-lock-sha256"
    if not stamp.exists() or stamp.read_text() != digest:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            check=True,
            timeout=600,
        )
        stamp.write_text(digest)
    versions = {}
    for alias, major in PACKAGES.items():
        meta = json.loads((JS / "node_modules" / alias / "package.json").read_text())
        if meta["name"] != "ai" or int(meta["version"].split(".")[0]) != major:
            raise RuntimeError(f"tests/js/node_modules/{alias} is {meta['name']} {meta['version']}")
        versions[alias] = meta["version"]
    return versions


def run(script: str, *args: str, timeout: float = 120) -> Any:
    """Run ``tests/js/<script>`` with node; return the JSON it prints."""
    done = subprocess.run(
        ["node", script, *args], cwd=JS, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(f"node {script} failed:\n{done.stderr}")
    return json.loads(done.stdout)
