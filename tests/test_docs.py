"""The README and `--help`, tried as a new user would: every Python block runs (against vel's
fake OpenAI server and the real Redis and Postgres), every shell command and flag it shows
exists, the multi-worker sample output is what the example prints, every `vel ...` command
the docs name parses, and `vel --help` is plain text with every default shown."""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import schema_dsn
from test_examples import example_env, run_example

import vel
from vel import Agent
from vel.cli import _parser
from vel.testing import FakeOpenAIServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
SETTINGS_SOURCE = (ROOT / "vel" / "settings.py").read_text()


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int


def blocks(text: str) -> list[Block]:
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        found.append(Block(match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1))
    return found


def test_every_readme_block_says_what_it_is() -> None:
    langs = [(b.line, b.lang) for b in blocks(README)]
    assert langs and all(lang in ("python", "sh", "text") for _, lang in langs), langs


# -- Python blocks ---------------------------------------------------------------------------


async def run_block(block: Block, namespace: dict[str, Any]) -> None:
    code = compile(
        block.code, f"README.md:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    result = eval(code, namespace)  # a coroutine when the block awaits at top level
    if inspect.iscoroutine(result):
        await result


async def test_readme_python_blocks_run_against_the_fake_server_and_real_services(
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    migrated_schema: str,
    redis_url: str,
    key_prefix: str,
) -> None:
    with FakeOpenAIServer() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "fake")
        monkeypatch.setenv("POSTGRES_DSN", schema_dsn(pg_dsn, migrated_schema))
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("VEL_KEY_PREFIX", key_prefix)
        # The Agents SDK block: its traces would go to api.openai.com, unreachable here.
        monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
        # A module of its own, as a user's script would be (dataclasses look it up).
        module = types.ModuleType("readme_snippets")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        namespace = module.__dict__
        python = [b for b in blocks(README) if b.lang == "python"]
        assert len(python) >= 3
        try:
            for block in python:
                await run_block(block, namespace)
                if "What is my name?" in block.code:
                    # The quick start's second turn remembers the first (redis storage).
                    assert namespace["answer"] == "Your name is Alice."
                    assert namespace["agent"].store.__class__.__name__ == "TieredStore"
                if "def weather" in block.code:
                    # The tool block's function, called the way the model calls it.
                    args = '{"place": {"city": "Oslo"}, "unit": "celsius", "when": "2024-05-01"}'
                    answer = await namespace["forecaster"].run(
                        {"message": f"[[call weather {args}]]"}
                    )
                    assert answer == "Tool results: 1 days of sun in Oslo from 01 May (celsius)"
                if "VelSession" in block.code:
                    # The Agents SDK's runs, kept by vel: the second answers from the first.
                    assert namespace["result"].final_output == "Your name is Alice."
                    session = namespace["session"]
                    items = await session.store.load(session.session_id)
                    assert [i.get("role") for i in items] == ["user", "assistant"] * 2
            history = await namespace["agent"].ctxmgr.aget_session_context("user-123")
            assert history == []  # the session operations block ended with a clear
        finally:
            for value in list(namespace.values()):
                if isinstance(value, Agent):
                    await value.aclose()


# -- shell blocks ----------------------------------------------------------------------------


def known_variable(name: str) -> bool:
    return name.startswith("OPENAI_") or f'"{name}"' in SETTINGS_SOURCE


def flags(words: list[str]) -> set[str]:
    return {w.split("=")[0] for w in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w)}


def help_of(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout


def check_vel(args: list[str]) -> None:
    try:
        _parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"`vel {shlex.join(args)}` does not parse") from exc


def check_command(words: list[str]) -> None:
    """One command of a README shell line: it must exist and take the flags shown."""
    head, args = words[0], words[1:]
    if head == "export":
        for assignment in args:
            name = assignment.split("=")[0]
            assert known_variable(name), f"README exports {name}, which nothing reads"
    elif head == "bash" or head.startswith("scripts/"):
        script = args[0] if head == "bash" else head
        assert (ROOT / script).is_file(), script
    elif head.endswith("/vel") or head == "vel":
        check_vel(args)
    elif head.endswith("/python") or head == "python":
        if args[0] == "-m":
            module, rest = args[1], args[2:]
            assert importlib.util.find_spec(module) is not None, module
            if module == "vel":
                check_vel(rest)
                return
            shown = help_of("-m", module)
        else:
            script, rest = args[0], args[1:]
            assert (ROOT / script).is_file(), script
            shown = help_of(script)
        for flag in flags(rest):
            assert re.search(rf"{flag}\b", shown), f"{flag} is not a flag of {args[:2]}"
    elif head == "pip":
        assert args[0] == "install"
        assert all(a == vel.DISTRIBUTION or a.startswith(".") for a in args[1:]), args
    else:
        raise AssertionError(f"a README shell block runs {head!r}: teach this test to check it")


def shell_commands(code: str) -> list[list[str]]:
    commands: list[list[str]] = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "&", "|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def test_readme_shell_blocks_name_commands_and_flags_that_exist() -> None:
    commands = [c for b in blocks(README) if b.lang == "sh" for c in shell_commands(b.code)]
    assert len(commands) >= 8
    for command in commands:
        check_command(command)


def test_the_checker_refuses_what_does_not_exist() -> None:
    for bad in (
        "vel migrate --redis-url redis://x",
        "python examples/multi_worker.py --wokers 3",
        "python -m vel.testing.fake_openai --prot 1",
        "export VEL_NO_SUCH_SETTING=1",
        "pip install vel",
        "bash scripts/nothing",
    ):
        with pytest.raises(AssertionError):
            for command in shell_commands(bad):
                check_command(command)


# -- `vel ...` named anywhere in the docs ----------------------------------------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for name, text in {"README.md": README, **DOCS}.items():
        for span in re.findall(r"`(vel [^`]*)`", text):
            found.append((name, span))
    return found


def test_every_vel_command_the_docs_name_exists_with_its_flags() -> None:
    top = _parser()
    commands = subparsers(top)
    spans = documented_commands()
    assert len(spans) >= 40
    for doc, span in spans:
        words = span.replace("\\|", "|").split()[1:]
        while words and words[0].startswith("-"):  # global flags: vel --log-format json ...
            action = top._option_string_actions.get(words.pop(0))
            assert action is not None, (doc, span)
            if action.nargs != 0:
                value = words.pop(0)
                assert action.choices is None or value in action.choices, (doc, span)
        if not words or words[0] in ("...", "COMMAND"):  # "vel COMMAND --help": any command
            continue
        assert words[0] in commands, (doc, span)
        parser = commands[words[0]]
        allowed = option_strings(parser)
        nested = subparsers(parser)
        if nested and len(words) > 1:
            for action in words[1].split("|"):
                assert action in nested, (doc, span)
                allowed |= option_strings(nested[action])
        for flag in flags([w.strip("[]()") for w in words]):
            assert flag in allowed, f"{doc}: `{span}` names {flag}, which `vel` does not take"


# -- the multi-worker sample -----------------------------------------------------------------


def normalised(output: str) -> list[str]:
    """Lines with what changes from run to run (pids, the fake server's port, the session
    id) replaced."""
    text = re.sub(r"pid \d+", "pid N", output)
    text = re.sub(r"pids [\d, ]+\)", "pids ...)", text)
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"'multi-[0-9a-f]{8}'", "'multi-ID'", text)
    return text.strip().splitlines()


async def test_readme_multi_worker_sample_is_what_the_example_prints(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    section = README.split("## Multi-worker demo in three commands", 1)[1]
    sample = next(b for b in blocks(section) if b.lang == "text")
    env = example_env(pg_dsn, migrated_schema, redis_url, key_prefix)
    out = await asyncio.to_thread(run_example, "multi_worker.py", "--workers", "3", env=env)
    assert normalised(sample.code) == normalised(out)
    # The pids differ per worker in the sample as in the run.
    pids = re.findall(r"\[worker (\d), pid (\d+)\]", sample.code)
    assert len({p for _, p in pids}) == 3 and len({(w, p) for w, p in pids}) == 3


# -- `--help` --------------------------------------------------------------------------------


def every_parser() -> dict[str, argparse.ArgumentParser]:
    found = {"vel": _parser()}
    pending = list(found.items())
    while pending:
        name, parser = pending.pop()
        for sub, child in subparsers(parser).items():
            found[f"{name} {sub}"] = child
            pending.append((f"{name} {sub}", child))
    return found


def test_help_is_plain_text_with_every_option_explained_and_its_default_shown() -> None:
    parsers = every_parser()
    assert {"vel migrate", "vel flusher", "vel sessions list", "vel stats"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert "``" not in text and ":class:" not in text, name
        if name != "vel":
            assert parser.description, f"`{name} --help` says nothing about what it does"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{label} has no help"
            default = action.default
            if action.option_strings and default is not None and not isinstance(default, bool):
                assert f"(default: {default})" in " ".join(text.split()), label


def test_each_command_offers_only_the_connection_flags_it_uses() -> None:
    parsers = every_parser()
    # migrate follows the namespace (--prefix picks the schema) but never touches Redis.
    assert "--redis-url" not in option_strings(parsers["vel migrate"])
    assert {"--dsn", "--prefix", "--schema"} <= option_strings(parsers["vel migrate"])
    # stats reads Postgres only for 'database'-mode summaries (vel_summaries).
    assert {"--dsn", "--schema"} <= option_strings(parsers["vel stats"])
    assert "--redis-url" in option_strings(parsers["vel stats"])
    assert option_strings(parsers["vel demo"]) & {"--dsn", "--redis-url", "--prefix"} == set()
    for name in ("vel flusher", "vel warm", "vel doctor", "vel sessions list"):
        assert {"--dsn", "--redis-url", "--prefix"} <= option_strings(parsers[name]), name


def test_the_flusher_metrics_listen_on_loopback_unless_told() -> None:
    args = _parser().parse_args(["flusher", "--metrics-port", "0"])
    assert args.metrics_host == "127.0.0.1"
