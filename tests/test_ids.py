"""Cheap ids (vel._ids) stay unique across processes and forks, and the fast window decoder
reads back exactly what the stdlib does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vel._ids import new_id, new_ids
from vel.errors import InvalidInputError
from vel.messages import check_message_ids, decode_items, decode_texts, new_message_ids


def test_ids_are_unique_and_valid_message_ids() -> None:
    ids = new_ids(10_000) + [new_id() for _ in range(10_000)] + new_message_ids(100)
    assert len(set(ids)) == len(ids)
    assert check_message_ids(ids[:1000], 1000) == ids[:1000]  # the message-id alphabet


def test_a_forked_child_draws_ids_of_its_own() -> None:
    before = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave at once
        os.close(read)
        os.write(write, json.dumps(new_ids(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent = new_ids(100)
    assert not set(child) & set(parent)
    # Not merely a later counter value: the child's prefix is its own.
    assert child[0][:16] != before[:16] and parent[0][:16] == before[:16]


def test_other_processes_draw_other_ids() -> None:
    code = "from vel._ids import new_ids; print(' '.join(new_ids(1000)))"
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    first, second = (set(r.stdout.split()) for r in runs)
    assert len(first) == len(second) == 1000 and not first & second


@pytest.mark.parametrize(
    "text",
    [
        '{"role":"user","content":"plain"}',
        '{"role":"user","content":"h\\u00e9 \\ud83d\\ude00 caf\\u00e9","n":123456789012345678901}',
        '{"a":1e400,"b":[1,2.5,{"c":null}],"d":"\\ud800 lone escape"}',
        '{"dup":1,"dup":2}',
    ],
)
def test_window_decoding_matches_the_stdlib(text: str) -> None:
    items = [b"id1\n" + text.encode(), b"id2\n" + text.encode()]
    assert decode_items(items) == [json.loads(text), json.loads(text)]
    assert decode_texts([text, text]) == [json.loads(text), json.loads(text)]


def test_window_decoding_refuses_what_the_stdlib_refuses() -> None:
    with pytest.raises(InvalidInputError):
        decode_items([b"id\n[1, 2]"])
    with pytest.raises(ValueError):
        decode_items([b"id\n{not json"])
    with pytest.raises(InvalidInputError):
        decode_texts(["[1, 2]"])
