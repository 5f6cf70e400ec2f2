"""``vel sessions list|show``: listings by owner, metadata and activity, with a cursor for the
next page, and a session's details and messages, a page at a time if asked.

In redis mode both read what Postgres has for listings (a session appears once flushed, at most
one flush interval after its write), and the messages from Redis where it holds them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from vel.bounds import AGE, MAX_COUNT, Bound, cli
from vel.catalog_ops import catalog_of
from vel.cli._common import Backends, open_backends
from vel.errors import InvalidInputError, StoreError
from vel.messages import validate_session_id
from vel.stores.listing import (
    MAX_PAGE,
    SessionDetails,
    check_metadata,
    check_page_limit,
    check_seq,
    make_query,
)

# --limit of `sessions list` (one page holds MAX_PAGE at most: the rest comes with --cursor) and of
# `sessions show` (one page).
_SESSIONS = Bound(1, MAX_COUNT, integer=True)
_PAGE = Bound(1, MAX_PAGE, integer=True)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


async def flush_first(b: Backends, timeout: float) -> None:
    """In redis mode, write what Redis still holds so Postgres (which is read) is complete."""
    if b.tiered is None:
        return
    if not await b.tiered.flush(timeout):
        unflushed = (await b.tiered.hot.backlog())[0]
        raise StoreError(
            f"{unflushed} messages could not be flushed to Postgres within {timeout} s "
            "(is a flusher failing? see `vel doctor`); pass --no-flush to use what Postgres has"
        )


def _row(info: SessionDetails) -> dict[str, Any]:
    return {
        "id": info.session_id,
        "owner": info.owner,
        "metadata": info.metadata,
        "messages": info.message_count,
        "created_at": iso(info.created_at),
        "updated_at": iso(info.updated_at),
        "expires_at": iso(info.expires_at),
    }


def _metadata_arg(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--metadata is not JSON ({exc.msg})") from None
    return check_metadata(value, "--metadata")[0]


async def cmd_list(args: argparse.Namespace) -> int:
    async with open_backends(args) as b:
        if args.older_than is not None:
            # The clean-up listing: idle sessions, least recently updated first.
            infos = await b.store.list_sessions(inactive_for=args.older_than, limit=args.limit)
            rows = [
                {
                    "id": i.session_id,
                    "messages": i.message_count,
                    "created_at": iso(i.created_at),
                    "updated_at": iso(i.updated_at),
                    "expires_at": iso(i.expires_at),
                }
                for i in infos
            ]
            cursor = None
        else:
            query = make_query(
                args.owner,
                _metadata_arg(args.metadata),
                args.order,
                min(int(args.limit), MAX_PAGE),
                args.cursor,
            )
            page = await catalog_of(b.store).find_sessions(query)
            rows = [_row(i) for i in page.sessions]
            cursor = page.next_cursor
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        print(f"{'SESSION':40} {'OWNER':20} {'MESSAGES':>8}  {'UPDATED (UTC)':19}  EXPIRES (UTC)")
        for row in rows:
            updated = str(row["updated_at"])[:19].replace("T", " ")
            expires = row["expires_at"] and str(row["expires_at"])[:19].replace("T", " ")
            print(
                f"{row['id']:40} {row.get('owner') or '-'!s:20} {row['messages']:>8}  "
                f"{updated:19}  {expires or 'never'}"
            )
    order = "least recently updated first" if args.older_than is not None else args.order
    more = f"; next page: --cursor {cursor}" if cursor else ""
    print(f"({len(rows)} sessions, {order}{more})", file=sys.stderr)
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
    before = check_seq(args.before, "--before")
    after = check_seq(args.after, "--after")
    paged = before is not None or after is not None or args.limit is not None
    async with open_backends(args) as b:
        info = await catalog_of(b.store).session_details(session_id)
        if info is None:
            raise InvalidInputError(f"session {session_id!r} has no messages (unknown or expired)")
        if paged:
            limit = check_page_limit(args.limit if args.limit is not None else 50)
            page = await catalog_of(b.store).history_page(session_id, before, after, limit)
            messages, seqs = page.messages, page.seqs
        else:
            messages = await b.store.load(session_id)
            seqs = list(range(info.message_count - len(messages) + 1, info.message_count + 1))
    if args.json:
        print(json.dumps(messages, indent=2))
        return 0
    owner = info.owner if info.owner is not None else "-"
    print(
        f"# {session_id}: owner {owner}, {info.message_count} messages, "
        f"metadata {json.dumps(info.metadata, ensure_ascii=False)}",
        file=sys.stderr,
    )
    for seq, message in zip(seqs, messages, strict=True):
        kind = message.get("role") or message.get("type") or "?"
        print(f"{seq:4} {kind:9} {_text(dict(message))}")
    return 0


def register(base: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = base("list", "sessions with messages by last activity, a page at a time")
    p.add_argument(
        "--limit",
        type=cli(_SESSIONS, "--limit"),
        default=100,
        help=f"at most this many sessions (a page holds at most {MAX_PAGE})",
    )
    p.add_argument(
        "--older-than",
        type=cli(AGE, "--older-than"),
        metavar="SECONDS",
        help="only sessions idle this long, least recently updated first (for clean-up)",
    )
    p.add_argument("--owner", help="only this owner's sessions")
    p.add_argument(
        "--metadata", metavar="JSON", help="only sessions whose metadata contains this object"
    )
    p.add_argument(
        "--order", choices=("newest", "oldest"), default="newest", help="by last activity"
    )
    p.add_argument("--cursor", help="the next page of a listing (printed after each page)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_list)

    p = base("show", "print a session's details and messages (all, or a page)")
    p.add_argument("session_id", help="the session to print")
    p.add_argument("--before", type=int, metavar="SEQ", help="the page before this seq")
    p.add_argument("--after", type=int, metavar="SEQ", help="the page after this seq")
    p.add_argument(
        "--limit", type=cli(_PAGE, "--limit"), help="messages per page (default 50 when paging)"
    )
    p.add_argument("--json", action="store_true", help="the messages as one JSON array")
    p.set_defaults(run=cmd_show)
