"""``vel sessions list|show|export|import|delete|purge``.

Export writes JSON Lines, one session per line::

    {"id": "...", "created_at": "...", "updated_at": "...", "expires_at": null,
     "metadata": {}, "messages": [{"role": "user", "content": "hi"}, ...],
     "message_ids": ["...", ...]}

Import reads the same. Its conflict rule: a session that already has messages is skipped
(so re-importing a file changes nothing), unless ``--replace`` is given, which replaces that
session's whole history with the file's. New sessions are appended with their exported
message ids, so an import that was interrupted can simply be run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from vel.bounds import AGE, COUNT, WAIT, cli
from vel.cli._common import (
    Backends,
    add_command,
    add_connection_flags,
    add_storage_flag,
    need_dsn,
    open_backends,
    open_output,
    placement_of,
    read_input,
    settings_from,
)
from vel.errors import InvalidInputError, StoreError
from vel.messages import validate_session_id


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


async def _flush_first(b: Backends, timeout: float) -> None:
    """In redis mode, write what Redis still holds so Postgres (which is read) is complete."""
    if b.tiered is None:
        return
    if not await b.tiered.flush(timeout):
        unflushed = (await b.tiered.hot.backlog())[0]
        raise StoreError(
            f"{unflushed} messages could not be flushed to Postgres within {timeout} s "
            "(is a flusher failing? see `vel doctor`); pass --no-flush to use what Postgres has"
        )


# -- list / show --------------------------------------------------------------------------------


async def cmd_list(args: argparse.Namespace) -> int:
    async with open_backends(args) as b:
        infos = await b.store.list_sessions(inactive_for=args.older_than, limit=args.limit)
    if args.json:
        for info in infos:
            print(
                json.dumps(
                    {
                        "id": info.session_id,
                        "messages": info.message_count,
                        "created_at": _iso(info.created_at),
                        "updated_at": _iso(info.updated_at),
                        "expires_at": _iso(info.expires_at),
                    }
                )
            )
        return 0
    print(f"{'SESSION':40} {'MESSAGES':>8}  {'UPDATED (UTC)':19}  EXPIRES (UTC)")
    for info in infos:
        expires = "never" if info.expires_at is None else f"{info.expires_at:%Y-%m-%d %H:%M:%S}"
        print(
            f"{info.session_id:40} {info.message_count:>8}  "
            f"{info.updated_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {expires}"
        )
    print(f"({len(infos)} sessions, least recently updated first)", file=sys.stderr)
    return 0


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif content is None:
        text = ""
    else:
        text = json.dumps(content)
    for call in message.get("tool_calls") or []:
        fn = call.get("function", {})
        text += f" [calls {fn.get('name')}({fn.get('arguments')})]"
    return text


async def cmd_show(args: argparse.Namespace) -> int:
    session_id = validate_session_id(args.session_id)
    async with open_backends(args) as b:
        messages = await b.store.load(session_id)
    if not messages:
        raise InvalidInputError(f"session {session_id!r} has no messages (unknown or expired)")
    if args.json:
        print(json.dumps(messages, indent=2))
    else:
        for i, message in enumerate(messages, 1):
            kind = message.get("role") or message.get("type") or "?"
            print(f"{i:4} {kind:9} {_text(dict(message))}")
    return 0


# -- export / import ----------------------------------------------------------------------------


async def cmd_export(args: argparse.Namespace) -> int:
    from vel.cli._pg import EXPORT, connection

    ids = [validate_session_id(s) for s in args.ids] or None
    out = open_output(args.out)
    sessions = messages = 0
    try:
        if not args.no_flush:
            async with open_backends(args) as b:
                await _flush_first(b, args.flush_timeout)
        settings = settings_from(args)
        dsn = need_dsn(settings)
        async with (
            connection(dsn, placement_of(settings)) as conn,
            conn.transaction(isolation="repeatable_read"),
        ):
            async for row in conn.cursor(EXPORT, ids, prefetch=200):
                pairs = json.loads(row["messages"] or "[]")
                entry = {
                    "id": row["id"],
                    "created_at": _iso(row["created_at"]),
                    "updated_at": _iso(row["updated_at"]),
                    "expires_at": _iso(row["expires_at"]),
                    "metadata": json.loads(row["metadata"]),
                    "messages": [message for _, message in pairs],
                    "message_ids": [mid for mid, _ in pairs],
                }
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                sessions += 1
                messages += len(pairs)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {sessions} sessions ({messages} messages)", file=sys.stderr)
    return 0


def _parse(line: str, number: int) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"line {number}: not JSON ({exc.msg})") from None
    if not isinstance(entry, dict):
        raise InvalidInputError(f"line {number}: expected an object")
    try:
        validate_session_id(entry.get("id"))
    except InvalidInputError as exc:
        raise InvalidInputError(f"line {number}: {exc}") from None
    messages = entry.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidInputError(f"line {number}: 'messages' must be a list of objects")
    ids = entry.get("message_ids")
    if ids is not None and (
        not isinstance(ids, list)
        or len(ids) != len(messages)
        or not all(isinstance(i, str) for i in ids)
    ):
        raise InvalidInputError(f"line {number}: 'message_ids' must match 'messages'")
    if not isinstance(entry.get("metadata", {}), dict):
        raise InvalidInputError(f"line {number}: 'metadata' must be an object")
    created = entry.get("created_at")
    if created is not None:
        try:
            entry["created_at"] = datetime.fromisoformat(created)
        except (TypeError, ValueError):
            raise InvalidInputError(f"line {number}: bad created_at {created!r}") from None
    return entry


async def _exists(b: Backends, session_id: str) -> bool:
    if b.tiered is not None:
        return bool(await b.tiered.load(session_id, 1))
    return (await b.cold.last_seq(session_id))[1] > 0


async def cmd_import(args: argparse.Namespace) -> int:
    from vel.cli._pg import FIX_IMPORTED, connection

    text = read_input(args.file)
    # Every line is checked before anything is written: a bad file imports nothing.
    entries = [_parse(line, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    imported = skipped = replaced = messages = 0
    async with open_backends(args) as b:
        for entry in entries:
            sid = entry["id"]
            if await _exists(b, sid):
                if not args.replace:
                    skipped += 1
                    continue
                await b.store.replace(sid, entry["messages"])
                replaced += 1
            elif entry["messages"]:
                await b.store.append(sid, entry["messages"], entry.get("message_ids"))
                imported += 1
            else:
                continue
            messages += len(entry["messages"])
        await _flush_first(b, args.flush_timeout)
        touched = [e for e in entries if e["messages"]]
        async with connection(need_dsn(b.settings), b.placement) as conn:
            await conn.executemany(
                FIX_IMPORTED,
                [
                    (e["id"], json.dumps(e.get("metadata") or {}), e.get("created_at"))
                    for e in touched
                    if e.get("metadata") or e.get("created_at")
                ],
            )
    print(
        f"imported {imported} sessions, replaced {replaced}, skipped {skipped} existing "
        f"({messages} messages written)"
    )
    return 0


# -- delete / purge -----------------------------------------------------------------------------


async def cmd_delete(args: argparse.Namespace) -> int:
    ids = [validate_session_id(s) for s in args.session_ids]
    deleted, missing = [], []
    async with open_backends(args) as b:
        for sid in ids:
            if await _exists(b, sid):
                await b.store.clear(sid)
                deleted.append(sid)
            else:
                missing.append(sid)
        await _flush_first(b, args.flush_timeout)
    print(f"deleted {len(deleted)} sessions")
    if missing:
        print(f"not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


async def cmd_purge(args: argparse.Namespace) -> int:
    from vel.cli._pg import EXPIRED, connection

    async with open_backends(args) as b:
        expired: list[str] = []
        if b.tiered is not None:
            async with connection(need_dsn(b.settings), b.placement) as conn:
                expired = [r["id"] for r in await conn.fetch(EXPIRED)]
        purged = await b.cold.purge_expired()
        dropped = await b.hot.drop_clean(expired) if b.hot is not None else 0
    where = f", {dropped} Redis copies" if b.tiered is not None else ""
    print(f"purged {purged} expired sessions from Postgres{where}")
    return 0


def register(sub: Any) -> None:
    parent = add_command(sub, "sessions", "list, show, export, import, delete, purge")
    ss = parent.add_subparsers(dest="action", required=True)

    def base(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ss.add_parser(name, help=text, description=text)
        add_connection_flags(p)
        add_storage_flag(p)
        return p

    def flush_flags(p: argparse.ArgumentParser, skip: bool) -> None:
        p.add_argument(
            "--flush-timeout",
            type=cli(WAIT, "--flush-timeout"),
            default=30.0,
            help="seconds to flush Redis first",
        )
        if skip:
            p.add_argument(
                "--no-flush", action="store_true", help="read Postgres without flushing first"
            )

    p = base("list", "sessions with messages, least recently updated first")
    p.add_argument(
        "--limit", type=cli(COUNT, "--limit"), default=100, help="at most this many sessions"
    )
    p.add_argument(
        "--older-than",
        type=cli(AGE, "--older-than"),
        metavar="SECONDS",
        help="only sessions idle this long",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_list)

    p = base("show", "print a session's messages")
    p.add_argument("session_id", help="the session to print")
    p.add_argument("--json", action="store_true", help="the messages as one JSON array")
    p.set_defaults(run=cmd_show)

    p = base("export", "write sessions as JSON Lines (all live sessions, or the given ids)")
    p.add_argument("ids", nargs="*", metavar="ID", help="sessions to export (default: all)")
    p.add_argument("--out", help="file to write (default: stdout)")
    flush_flags(p, skip=True)
    p.set_defaults(run=cmd_export)

    p = base("import", "read sessions from JSON Lines; existing sessions are skipped")
    p.add_argument("file", nargs="?", help="JSONL file (default: stdin)")
    p.add_argument(
        "--replace", action="store_true", help="replace the history of existing sessions"
    )
    flush_flags(p, skip=False)
    p.set_defaults(run=cmd_import)

    p = base("delete", "delete sessions (both tiers)")
    p.add_argument("session_ids", nargs="+", metavar="ID", help="sessions to delete")
    flush_flags(p, skip=False)
    p.set_defaults(run=cmd_delete)

    p = base("purge", "delete expired sessions from Postgres and their copies from Redis")
    p.set_defaults(run=cmd_purge)
