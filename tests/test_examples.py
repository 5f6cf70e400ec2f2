"""The examples run as documented, offline (against vel's fake OpenAI server)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def context_modes_output() -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "context_modes.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def final_answers(output: str) -> dict[str, str]:
    summary = output.split("What each mode answered to 'What is my name?':", 1)[1]
    return dict(re.findall(r"^\s+(full|stateless|limited)\s+(.+)$", summary, re.MULTILINE))


def test_context_modes_runs_offline_on_the_fake_server(context_modes_output: str) -> None:
    assert "using vel's fake OpenAI server" in context_modes_output


def test_context_modes_full_memory_remembers_the_name(context_modes_output: str) -> None:
    assert "Alice" in final_answers(context_modes_output)["full"]


def test_context_modes_stateless_forgets_and_stores_nothing(context_modes_output: str) -> None:
    assert "Alice" not in final_answers(context_modes_output)["stateless"]
    assert "(0 messages stored in session 'demo-stateless')" in context_modes_output


def test_context_modes_limited_history_forgets_but_still_stores(
    context_modes_output: str,
) -> None:
    assert "Alice" not in final_answers(context_modes_output)["limited"]
    assert "(6 messages stored in session 'demo-limited')" in context_modes_output
