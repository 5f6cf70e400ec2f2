"""``vel sessions list|show|export|import|delete|purge|conflicts|resolve|release``.

Export writes JSON Lines, one session per line::

    {"id": "...", "created_at": "...", "updated_at": "...", "expires_at": null,
     "metadata": {}, "messages": [{"role": "user", "content": "hi"}, ...],
     "message_ids": ["...", ...]}

Import reads the same, sessions of any length. Its conflict rule: a session that already has
messages is skipped (so re-importing a file changes nothing), unless ``--replace`` is given,
which replaces that session's whole history with the file's. A file is all or nothing: every
line is checked (JSON, ids, every message) before anything is written, and with ``--storage
database`` the whole file is written in one transaction. Each session's history is written as
one replace with its exported message ids, so readers see it whole, and an import that was
interrupted (redis mode) can simply be run again.

``conflicts``, ``resolve`` and ``release`` serve the two-tier store's rules for mixed modes
(DESIGN.md 3.8): list the sessions whose flush Postgres could not apply, resolve one by
keeping Postgres' history, both, or the Redis copy, and hand a session back to 'database'
mode writers.
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
from vel.messages import check_message_ids, encode_messages, validate_session_id


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
                conflicts = await b.hot.conflict_count() if b.hot is not None else 0
            if conflicts:
                print(
                    f"warning: {conflicts} sessions are in flush conflict; the export holds "
                    "what Postgres has of them (see `vel sessions conflicts`)",
                    file=sys.stderr,
                )
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
    """One line of an import, checked whole: the messages are encoded as the stores will
    store them (``entry["texts"]``), so nothing of a bad file reaches a store."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"line {number}: not JSON ({exc.msg})") from None
    if not isinstance(entry, dict):
        raise InvalidInputError(f"line {number}: expected an object")
    try:
        validate_session_id(entry.get("id"))
        messages = entry.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidInputError("'messages' must be a list of objects")
        ids = entry.get("message_ids")
        if ids is not None and (
            not isinstance(ids, list)
            or len(ids) != len(messages)
            or not all(isinstance(i, str) for i in ids)
        ):
            raise InvalidInputError("'message_ids' must match 'messages'")
        entry["texts"] = encode_messages(messages, whole_history=True)
        entry["message_ids"] = check_message_ids(ids, len(messages))
    except InvalidInputError as exc:
        raise InvalidInputError(f"line {number}: {exc}") from None
    if not isinstance(entry.get("metadata", {}), dict):
        raise InvalidInputError(f"line {number}: 'metadata' must be an object")
    created = entry.get("created_at")
    if created is not None:
        try:
            entry["created_at"] = datetime.fromisoformat(created)
        except (TypeError, ValueError):
            raise InvalidInputError(f"line {number}: bad created_at {created!r}") from None
    return entry


def _parse_file(text: str) -> list[dict[str, Any]]:
    """Every entry of an import file, or InvalidInputError naming the first bad line."""
    entries: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        entry = _parse(line, number)
        if entry["id"] in first_line:
            raise InvalidInputError(
                f"line {number}: session {entry['id']!r} was already given on line "
                f"{first_line[entry['id']]}"
            )
        first_line[entry["id"]] = number
        entries.append(entry)
    return entries


async def _exists(b: Backends, session_id: str) -> bool:
    if b.tiered is not None:
        return bool(await b.tiered.load(session_id, 1))
    return (await b.cold.last_seq(session_id))[1] > 0


async def cmd_import(args: argparse.Namespace) -> int:
    from vel.cli._pg import FIX_IMPORTED, connection
    from vel.stores.postgres import ImportEntry

    # Every line is checked before anything is written: a bad file imports nothing.
    entries = _parse_file(read_input(args.file))
    async with open_backends(args) as b:
        if b.tiered is None:
            counts = await b.cold.import_sessions(
                [
                    ImportEntry(
                        e["id"],
                        e["texts"],
                        e["message_ids"],
                        json.dumps(e["metadata"]) if e.get("metadata") else None,
                        e.get("created_at"),
                    )
                    for e in entries
                ],
                replace=args.replace,
            )
            imported, replaced, skipped = counts.imported, counts.replaced, counts.skipped
            messages = counts.messages
        else:
            imported = skipped = replaced = messages = 0
            for entry in entries:
                sid = entry["id"]
                exists = await _exists(b, sid)
                if exists and not args.replace:
                    skipped += 1
                    continue
                if not exists and not entry["messages"]:
                    continue
                # One replace per session: readers see none of it or all of it.
                await b.tiered.replace(sid, entry["messages"], entry["message_ids"])
                replaced += exists
                imported += not exists
                messages += len(entry["messages"])
            await _flush_first(b, args.flush_timeout)
            async with connection(need_dsn(b.settings), b.placement) as conn:
                await conn.executemany(
                    FIX_IMPORTED,
                    [
                        (e["id"], json.dumps(e.get("metadata") or {}), e.get("created_at"))
                        for e in entries
                        if e["messages"] and (e.get("metadata") or e.get("created_at"))
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
    async with open_backends(args) as b:
        if b.tiered is not None:
            purged, dropped = await b.tiered.purge_expired_tiers()
        else:
            purged, dropped = await b.cold.purge_expired(), 0
    where = f", {dropped} Redis copies" if b.tiered is not None else ""
    print(f"purged {purged} expired sessions from Postgres{where}")
    return 0


# -- mixed modes: conflicts, resolve, release -------------------------------------------------


async def cmd_conflicts(args: argparse.Namespace) -> int:
    args.storage = "redis"
    async with open_backends(args) as b:
        assert b.tiered is not None
        found = await b.tiered.hot.conflicts(args.limit)
        postgres = {c.session_id: await b.cold.last_seq(c.session_id) for c in found}
    rows = []
    for c in found:
        held = c.seq - (c.base if c.gen != c.fgen else c.flushed)
        rows.append(
            {
                "id": c.session_id,
                "reason": c.reason,
                "since": _iso(datetime.fromtimestamp(c.since_ms / 1000, UTC)),
                "redis_last_seq": c.seq,
                "redis_only_messages": held,
                "redis_holds_whole_history": c.base == 0,
                "postgres_last_seq": postgres[c.session_id][1],
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'SESSION':40} {'REASON':9} {'SINCE (UTC)':19}  REDIS-ONLY  POSTGRES SEQ")
    for row in rows:
        print(
            f"{row['id']:40} {row['reason']:9} {str(row['since'])[:19].replace('T', ' '):19}  "
            f"{row['redis_only_messages']:>10}  {row['postgres_last_seq']:>12}"
        )
    print(
        f"({len(rows)} sessions in conflict; resolve each with "
        "`vel sessions resolve ID --keep postgres|both|redis`)",
        file=sys.stderr,
    )
    return 0


async def cmd_resolve(args: argparse.Namespace) -> int:
    session_id = validate_session_id(args.session_id)
    args.storage = "redis"
    out = open_output(args.save) if args.save else None
    try:
        async with open_backends(args) as b:
            assert b.tiered is not None
            outcome = await b.tiered.resolve(session_id, args.keep)
        if out is not None and outcome.discarded:
            entry = {
                "id": session_id,
                "messages": [m for _, m in outcome.discarded],
                "message_ids": [mid for mid, _ in outcome.discarded],
            }
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    finally:
        if out is not None:
            out.close()
    kept = {"postgres": "Postgres' history", "both": "both", "redis": "the Redis copy"}
    dropped = (
        f", {len(outcome.discarded)} Redis-only messages discarded" if outcome.discarded else ""
    )
    print(f"resolved {session_id}: kept {kept[args.keep]}, {outcome.last_seq} messages{dropped}")
    return 0


async def cmd_release(args: argparse.Namespace) -> int:
    ids = [validate_session_id(s) for s in args.session_ids]
    args.storage = "redis"
    released: list[str] = []
    kept: list[str] = []
    async with open_backends(args) as b:
        assert b.tiered is not None
        await _flush_first(b, args.flush_timeout)
        for sid in ids:
            (released if await b.tiered.release(sid) else kept).append(sid)
    print(f"released {len(released)} sessions to 'database' mode")
    if kept:
        print(f"not released (unflushed or in conflict): {', '.join(kept)}", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    parent = add_command(
        sub, "sessions", "list, show, export, import, delete, purge, conflicts, resolve, release"
    )
    ss = parent.add_subparsers(dest="action", required=True)

    def base(name: str, text: str, *, storage: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ss.add_parser(name, help=text, description=text)
        add_connection_flags(p)
        if storage:
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

    p = base(
        "import",
        "read sessions from JSON Lines, all or nothing; existing sessions are skipped",
    )
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

    # The two tiers' own commands: they act on the Redis tier and Postgres together.
    p = base(
        "conflicts",
        "sessions whose flush to Postgres could not be applied (redis mode)",
        storage=False,
    )
    p.add_argument(
        "--limit", type=cli(COUNT, "--limit"), default=1000, help="at most this many sessions"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_conflicts)

    p = base(
        "resolve",
        "resolve a flush conflict: keep Postgres' history, both, or the Redis copy",
        storage=False,
    )
    p.add_argument("session_id", help="the session in conflict")
    p.add_argument(
        "--keep",
        required=True,
        choices=("postgres", "both", "redis"),
        help="postgres: Postgres' history (Redis-only messages discarded); both: Postgres' "
        "history, then the Redis-only messages; redis: the Redis copy, whole",
    )
    p.add_argument("--save", metavar="FILE", help="write discarded messages here (JSON Lines)")
    p.set_defaults(run=cmd_resolve)

    p = base(
        "release",
        "hand sessions from the Redis tier back to 'database'-mode writers",
        storage=False,
    )
    p.add_argument("session_ids", nargs="+", metavar="ID", help="sessions to release")
    flush_flags(p, skip=False)
    p.set_defaults(run=cmd_release)
