"""Secrets never show (issue 13, failing input 6): whatever a password holds (unencoded ``@ : /
# ? %`` and quotes included), in whatever form it is given (URL userinfo, ``?password=``,
a cluster URL with several hosts, a libpq ``key=value`` DSN), no repr, error (causes and
traceback included), log record or ``vel`` command output shows it, whole or in pieces.
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vel import Agent
from vel.cli import main as vel_main
from vel.redaction import normalize_userinfo, redact, split_userinfo
from vel.settings import Settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore

# Distinctive pieces ("x", 5-8 capitals, "9"): no vel message holds one by chance, so finding
# one anywhere means a piece of the password leaked.
PIECE = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ", min_size=5, max_size=8).map(lambda s: f"x{s}9")
SPECIALS = st.text(alphabet="@:/#?%&=+;,'\"!$ ", min_size=1, max_size=3)


@st.composite
def passwords(draw: st.DrawFn) -> tuple[str, list[str]]:
    pieces = draw(st.lists(PIECE, min_size=1, max_size=3, unique=True))
    seps = [draw(SPECIALS) for _ in pieces]
    lead = draw(st.sampled_from(["", "@", "#", "/", "%", ":"]))
    password = lead + "".join(p + s for p, s in zip(pieces, seps, strict=True))
    return password.strip(), pieces


def everything_said(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    parts.append("".join(traceback.format_exception(exc)))
    return "\n".join(parts)


def urls(password: str) -> dict[str, tuple[str, str]]:
    """(kind, URL or DSN) of every form, all unreachable or malformed."""
    enc = quote(password, safe="")
    libpq = password.replace("\\", "\\\\").replace("'", "\\'")
    return {
        "redis userinfo": ("redis", f"redis://app:{password}@127.0.0.1:1/0"),
        "redis no user": ("redis", f"redis://:{password}@127.0.0.1:1/0"),
        "redis query": ("redis", f"redis://127.0.0.1:1/0?password={enc}"),
        "redis encoded": ("redis", f"rediss://app:{enc}@127.0.0.1:1/0"),
        "redis bad db": ("redis", f"redis://app:{password}@127.0.0.1:1/notadb"),
        "redis bad port": ("redis", f"redis://app:{password}@127.0.0.1:99999/0"),
        "redis bad option": ("redis", f"redis://app:{password}@127.0.0.1:1/0?nope=1"),
        "cluster": ("redis", f"rediss+cluster://app:{password}@127.0.0.1:1,127.0.0.1:2"),
        "pg userinfo": ("pg", f"postgresql://app:{password}@127.0.0.1:1/db"),
        "pg query": ("pg", f"postgresql://app@127.0.0.1:1/db?password={enc}"),
        "pg bad port": ("pg", f"postgresql://app:{password}@127.0.0.1:99999/db"),
        "pg hosts": ("pg", f"postgresql://app:{password}@127.0.0.1:1,127.0.0.1:2/db"),
        "libpq": ("pg", f"host=127.0.0.1 port=1 password='{libpq}' dbname=db"),
    }


def assert_hidden(pieces: list[str], password: str, *texts: object) -> None:
    for text in texts:
        shown = str(text)
        for piece in pieces:
            assert piece not in shown, f"{piece!r} of the password leaked: {shown[:400]!r}"
        assert password not in shown or len(password) < 3


async def _try(store: Any) -> list[str]:
    said = [repr(store)]
    try:
        await store.load("s")
    except Exception as exc:
        said.append(everything_said(exc))
    finally:
        await store.aclose()
    return said


def _said_by_stores(kind: str, url: str) -> list[str]:
    settings = Settings(op_timeout=1.0)
    try:
        if kind == "redis":
            store: Any = RedisStore(url, settings=settings)
        else:
            store = PostgresStore(url, schema="app", settings=settings)
    except Exception as exc:
        return [everything_said(exc)]
    return asyncio.run(_try(store))


@settings(
    max_examples=int(os.environ.get("VEL_SECRETS_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(secret=passwords())
def test_no_password_shows_anywhere(
    secret: tuple[str, list[str]],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password, pieces = secret
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    said: list[str] = []
    for kind, url in urls(password).values():
        said += _said_by_stores(kind, url)
    # An Agent from the environment, and the commands operators run.
    monkeypatch.setenv("VEL_OP_TIMEOUT", "1")
    model = {"provider": "openai", "model": "m", "api_key": "k", "base_url": "http://127.0.0.1:1"}

    async def agent_turn() -> None:
        async with Agent(id="a", model=model, session_storage="redis") as agent:
            said.append(repr(agent))
            said.append(repr(agent.store))
            try:
                await agent.run({"message": "hi"}, session_id="s")
            except Exception as exc:
                said.append(everything_said(exc))
            await asyncio.sleep(0.2)  # the embedded flusher fails and logs meanwhile

    for redis_form, pg_form in (("redis userinfo", "pg userinfo"), ("redis query", "pg query")):
        monkeypatch.setenv("REDIS_URL", urls(password)[redis_form][1])
        monkeypatch.setenv("POSTGRES_DSN", urls(password)[pg_form][1])
        asyncio.run(agent_turn())
    monkeypatch.setenv("REDIS_URL", urls(password)["redis userinfo"][1])
    monkeypatch.setenv("POSTGRES_DSN", urls(password)["pg userinfo"][1])
    for argv in (["doctor"], ["stats"], ["sessions", "list"], ["migrate", "--show"]):
        vel_main(argv)
        out = capsys.readouterr()
        said += [out.out, out.err]
    monkeypatch.setenv("REDIS_URL", urls(password)["redis bad db"][1])
    monkeypatch.setenv("POSTGRES_DSN", urls(password)["pg bad port"][1])
    for argv in (["doctor"], ["stats"], ["sessions", "list"]):
        vel_main(argv)
        out = capsys.readouterr()
        said += [out.out, out.err]
    logged = [
        f"{r.getMessage()}\n{r.exc_text or ''}\n{logging.Formatter().format(r)}"
        for r in caplog.records
    ]
    assert_hidden(pieces, password, *said, *logged)


@given(secret=passwords())
def test_redact_hides_every_form(secret: tuple[str, list[str]]) -> None:
    password, pieces = secret
    for _, url in urls(password).values():
        assert_hidden(pieces, password, redact(url))
        if " " not in password:  # in free text a URL ends at whitespace
            assert_hidden(pieces, password, redact(f"failed at {url} (retrying)"))


@given(secret=passwords())
def test_vel_reads_the_password_whole(secret: tuple[str, list[str]]) -> None:
    """What vel connects with is the password as given, unencoded specials included."""
    from urllib.parse import unquote

    password, _ = secret
    for url in (f"redis://app:{password}@h:1/0", f"postgresql://app:{password}@h:1/db"):
        _, user, raw, rest = split_userinfo(url)
        assert (user, raw) == ("app", password)
        assert rest in ("h:1/0", "h:1/db")
        _, _, encoded, _ = split_userinfo(normalize_userinfo(url))
        assert encoded is not None and unquote(encoded) == password
    from vel.stores.redis import parse_redis_url

    assert parse_redis_url(f"redis://app:{password}@h:1/0").password == password


def test_redact_examples() -> None:
    assert redact("redis://u:p@ss/w#rd@host:1/0") == "redis://u:***@host:1/0"
    assert redact("postgresql://u@h/db?sslmode=require&password=x&y=1") == (
        "postgresql://u@h/db?sslmode=require&password=***&y=1"
    )
    assert redact("host=h password='a b c' dbname=d") == "host=h password=*** dbname=d"
    assert redact("rediss+cluster://:pw@a:1,b:2") == "rediss+cluster://:***@a:1,b:2"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
