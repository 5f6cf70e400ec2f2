"""``vel sessions export|import|delete|purge``, and the registration of every ``vel sessions``
command (``list`` and ``show`` are in :mod:`.sessions_list`, the two tiers' ``conflicts``,
``resolve`` and ``release`` in :mod:`.sessions_tiers`).

Export writes JSON Lines, one session per line::

    {"id": "...", "created_at": "...", "updated_at": "...", "expires_at": null,
     "owner": null, "metadata": {}, "messages": [{"role": "user", "content": "hi"}, ...],
     "message_ids": ["...", ...]}

Import reads the same, sessions of any length. Its conflict rule: a session that already has
messages is skipped (so re-importing a file changes nothing), unless ``--replace`` is given,
which replaces that session's whole history with the file's. A file is all or nothing: every
line is checked (JSON, ids, every message) before anything is written, and with ``--storage
database`` the whole file is written in one transaction. Each session's history is written as
one replace with its exported message ids, so readers see it whole, and an import that was
interrupted (redis mode) can simply be run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from vel.bounds import WAIT, cli
from vel.cli import sessions_list, sessions_tiers
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
from vel.cli.sessions_list import flush_first, iso
from vel.errors import InvalidInputError
from vel.messages import check_message_ids, encode_messages, validate_session_id
from vel.stores.listing import check_owner

# -- export / import ----------------------------------------------------------------------------


async def cmd_export(args: argparse.Namespace) -> int:
    from vel.cli._pg import EXPORT, connection

    ids = [validate_session_id(s) for s in args.ids] or None
    out = open_output(args.out)
    sessions = messages = 0
    try:
        if not args.no_flush:
            async with open_backends(args) as b:
                await flush_first(b, args.flush_timeout)
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
                    "created_at": iso(row["created_at"]),
                    "updated_at": iso(row["updated_at"]),
                    "expires_at": iso(row["expires_at"]),
                    "owner": row["owner"],
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
    if entry.get("owner") is not None:
        try:
            check_owner(entry["owner"])
        except InvalidInputError as exc:
            raise InvalidInputError(f"line {number}: {exc}") from None
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
                        e.get("owner"),
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
            await flush_first(b, args.flush_timeout)
            async with connection(need_dsn(b.settings), b.placement) as conn:
                await conn.executemany(
                    FIX_IMPORTED,
                    [
                        (
                            e["id"],
                            json.dumps(e.get("metadata") or {}),
                            e.get("created_at"),
                            e.get("owner"),
                        )
                        for e in entries
                        if e["messages"]
                        and (e.get("metadata") or e.get("created_at") or e.get("owner"))
                    ],
                )
    print(
        f"imported {imported} sessions, replaced {replaced}, skipped {skipped} existing "
        f"({messages} messages written)"
    )
    return 0


# -- delete / purge -----------------------------------------------------------------------------


async def cmd_delete(args: argparse.Namespace) -> int:
    if bool(args.session_ids) == (args.owner is not None):
        raise InvalidInputError("give session ids or --owner, not both")
    if args.owner is not None:
        from vel.catalog_ops import catalog_of

        owner = check_owner(args.owner)
        async with open_backends(args) as b:
            count = await catalog_of(b.store).delete_owner(owner)
            await flush_first(b, args.flush_timeout)
        print(f"deleted {count} sessions of owner {owner}")
        return 0
    ids = [validate_session_id(s) for s in args.session_ids]
    deleted, missing = [], []
    async with open_backends(args) as b:
        for sid in ids:
            if await _exists(b, sid):
                await b.store.clear(sid)
                deleted.append(sid)
            else:
                missing.append(sid)
        await flush_first(b, args.flush_timeout)
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

    sessions_list.register(base)

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

    p = base("delete", "delete sessions, or every session of an owner (both tiers)")
    p.add_argument("session_ids", nargs="*", metavar="ID", help="sessions to delete")
    p.add_argument("--owner", help="delete every session of this owner, and its details")
    flush_flags(p, skip=False)
    p.set_defaults(run=cmd_delete)

    p = base("purge", "delete expired sessions from Postgres and their copies from Redis")
    p.set_defaults(run=cmd_purge)

    sessions_tiers.register(base, flush_flags)
