"""What every ``vel`` subcommand shares: settings from flags, the backends, output helpers."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TextIO

from vel.errors import ConfigurationError
from vel.namespace import Placement, place
from vel.settings import Settings, load_settings

if TYPE_CHECKING:
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore
    from vel.stores.tiered import TieredStore


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default (argparse's own formatter shows none, and its
    ArgumentDefaultsHelpFormatter also prints ``default: None`` for unset ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or isinstance(default, bool)
            or default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The ``vel`` parsers: every subcommand's help shows defaults the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_command(sub: Any, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with the summary ``vel --help`` lists."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=summary)
    return parser


def add_connection_flags(
    p: argparse.ArgumentParser, *, postgres: bool = True, redis: bool = True
) -> None:
    """The flags of the backends a command uses (and only those). The namespace flags
    (``--prefix``, ``--schema``) come with either backend: both tiers follow it."""
    if postgres:
        p.add_argument("--dsn", help="Postgres DSN (default: POSTGRES_DSN)")
    if redis:
        p.add_argument("--redis-url", help="Redis URL (default: REDIS_URL)")
    p.add_argument(
        "--prefix",
        help="namespace: the Redis key prefix, which also picks the Postgres schema "
        "(default: VEL_KEY_PREFIX or vel)",
    )
    if postgres:
        p.add_argument(
            "--schema",
            help="Postgres schema of vel's tables (default: VEL_PG_SCHEMA, else the DSN's "
            "search_path for prefix vel, else one derived from the prefix)",
        )


def placement_of(settings: Settings) -> Placement:
    """Where the namespace of ``settings`` keeps its Postgres tables (see vel.namespace)."""
    return place(
        schema=None,
        dsn=settings.postgres_dsn,
        env_schema=settings.pg_schema,
        prefix=settings.key_prefix,
    )


def add_storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        choices=("auto", "database", "redis"),
        default="auto",
        help="the session_storage your agents use: database (Postgres only) or redis "
        "(Redis written behind to Postgres); auto = redis",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    settings = load_settings()
    changes: dict[str, Any] = {}
    if getattr(args, "dsn", None):
        changes["postgres_dsn"] = args.dsn
    if getattr(args, "redis_url", None):
        changes["redis_url"] = args.redis_url
    if getattr(args, "prefix", None):
        changes["key_prefix"] = args.prefix
    if getattr(args, "schema", None):
        changes["pg_schema"] = args.schema
    return dataclasses.replace(settings, **changes)


def need_dsn(settings: Settings) -> str:
    if not settings.postgres_dsn:
        raise ConfigurationError("POSTGRES_DSN is not set (or pass --dsn)")
    return settings.postgres_dsn


@dataclasses.dataclass
class Backends:
    """The stores of one storage mode: ``store`` is what agents use; ``cold`` is always
    the Postgres tier; ``tiered``/``hot`` are set in redis mode."""

    mode: str
    settings: Settings
    cold: PostgresStore
    store: PostgresStore | TieredStore
    tiered: TieredStore | None = None

    @property
    def hot(self) -> RedisStore | None:
        return self.tiered.hot if self.tiered is not None else None

    @property
    def placement(self) -> Placement:
        return self.cold.placement


@asynccontextmanager
async def open_backends(args: argparse.Namespace) -> AsyncIterator[Backends]:
    """Open the stores of ``args.storage`` (Postgres is needed in both modes)."""
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore
    from vel.stores.tiered import TieredStore

    settings = settings_from(args)
    need_dsn(settings)
    mode = "redis" if args.storage == "auto" else args.storage
    cold = PostgresStore.from_settings(settings, pool_max=4)
    if mode == "redis":
        hot = RedisStore.from_settings(settings, write_behind=True)
        tiered = TieredStore(hot, cold, flusher=False, settings=settings)
        backends = Backends(mode, settings, cold, tiered, tiered)
        await hot.ping()
    else:
        backends = Backends(mode, settings, cold, cold)
    try:
        await cold.open()
        yield backends
    finally:
        if backends.tiered is not None:
            await backends.tiered.aclose()
        else:
            await cold.aclose()


def read_input(path: str | None) -> str:
    """The text of ``path`` (stdin for None or ``-``), as a one-line error when unreadable."""
    from vel.errors import InvalidInputError

    if path in (None, "-"):
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None


def open_output(path: str | None) -> TextIO:
    """``path`` opened for writing (stdout for None)."""
    from vel.errors import InvalidInputError

    if path is None:
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror}") from None


class Progress:
    """A one-line progress bar on stderr when it is a terminal (nothing otherwise)."""

    def __init__(self, total: int | None, label: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.total:
            width = 30
            filled = int(width * self.done / self.total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"\r{self.label} [{bar}] {self.done}/{self.total}"
        else:
            text = f"\r{self.label} {self.done}"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
