"""The hive's side of peer downloads (rbee.hive.sharing): who may ask, what it offers, and the
share rate. A real catalog and real files; the replies are collected."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, cast

import pytest

from rbee.catalog import Catalog
from rbee.errors import AccessDenied, ModelNotFound, RbeeError
from rbee.hive.request import Replies, Request
from rbee.hive.sharing import Sharing
from rbee.hub import chunks
from rbee.hub.files import RemoteFile
from rbee.hub.layout import local_path
from rbee.protocol.messages import ChunkData, FileHeld, FileQuery, Frame, ReadChunk

COMMIT = "c" * 40
DATA = bytes(range(256)) * (3 * chunks.CHUNK_BYTES // 256 + 100)  # four chunks
SHA = hashlib.sha256(DATA).hexdigest()
PEER = Request(b"peer", 1, "hive", "k" * 40)


class Collected:
    def __init__(self) -> None:
        self.sent: list[Frame] = []
        self.errors: list[RbeeError] = []

    def send(self, request: Request, frame: Frame) -> None:
        self.sent.append(frame)

    def error(self, request: Request, exc: RbeeError) -> None:
        self.errors.append(exc)


def sharing(tmp_path: Path, rate: int = 0, listed: bool = True) -> tuple[Sharing, Collected]:
    models = tmp_path / "models"
    dest = local_path(models, RemoteFile("org/m", "m.gguf", COMMIT, len(DATA), SHA, ""))
    dest.parent.mkdir(parents=True)
    dest.write_bytes(DATA)
    if listed:
        hasher = chunks.ChunkHasher()
        hasher.update(DATA)
        chunks.save(dest, hasher.finish(), SHA)
    replies = Collected()
    desk = Sharing(cast(Replies, replies), Catalog(tmp_path / "catalog.db"), models, rate)
    return desk, replies


def query(**fields: Any) -> FileQuery:
    return FileQuery(
        **{"repo": "org/m", "commit": COMMIT, "filename": "m.gguf", "sha256": SHA, **fields}
    )


def test_a_held_file_is_offered_with_its_chunk_list_and_read_by_chunk(tmp_path: Path) -> None:
    desk, replies = sharing(tmp_path)
    desk.on_query(PEER, query())
    held = replies.sent[-1]
    assert isinstance(held, FileHeld) and held.held and held.size == len(DATA)
    listed = chunks.ChunkList(held.size, held.chunk_bytes, held.hashes)
    for index in range(listed.count):
        desk.on_read(PEER, ReadChunk(sha256=SHA, index=index))
        chunk = replies.sent[-1]
        assert isinstance(chunk, ChunkData) and listed.matches(index, chunk.data)
    assert desk.sent_bytes == len(DATA)


def test_only_hive_and_admin_keys_may_ask(tmp_path: Path) -> None:
    desk, _ = sharing(tmp_path)
    keeper = Request(b"k", 2, "infer", "i" * 40)
    with pytest.raises(AccessDenied, match="hive or admin role"):
        desk.on_query(keeper, query())
    with pytest.raises(AccessDenied):
        desk.on_read(keeper, ReadChunk(sha256=SHA, index=0))


def test_what_is_not_here_or_not_offered_is_refused(tmp_path: Path) -> None:
    desk, replies = sharing(tmp_path)
    desk.on_query(PEER, query(sha256="0" * 64, commit="d" * 40))
    assert isinstance(replies.sent[-1], FileHeld) and not replies.sent[-1].held
    with pytest.raises(ModelNotFound):  # never offered: no reading by guessing a hash
        desk.on_read(PEER, ReadChunk(sha256=SHA, index=0))


def test_a_file_without_a_chunk_list_is_listed_off_the_loop_then_offered(tmp_path: Path) -> None:
    desk, replies = sharing(tmp_path, listed=False)
    desk.on_query(PEER, query())
    assert isinstance(replies.sent[-1], FileHeld) and not replies.sent[-1].held
    deadline = time.monotonic() + 5
    while desk._indexing and time.monotonic() < deadline:
        time.sleep(0.01)
    desk.on_query(PEER, query())
    assert isinstance(replies.sent[-1], FileHeld) and replies.sent[-1].held


def test_the_share_rate_holds_chunks_back_until_the_bucket_refills(tmp_path: Path) -> None:
    per_s = 4  # chunks per second: 16 MiB/s, a bucket of one chunk
    desk, replies = sharing(tmp_path, rate=per_s * chunks.CHUNK_BYTES)
    desk.on_query(PEER, query())
    for index in range(8):
        desk.on_read(PEER, ReadChunk(sha256=SHA, index=index % 3))  # full chunks
    start = time.monotonic()
    sent_at: list[float] = []
    step = 0.01
    for tick in range(300):  # three seconds of the loop's ticks, in virtual time
        now = start + tick * step
        before = sum(isinstance(f, ChunkData) for f in replies.sent)
        desk.tick(now)
        after = sum(isinstance(f, ChunkData) for f in replies.sent)
        sent_at += [tick * step] * (after - before)
        due = desk.due_in(now)
        if due is None:
            break
        assert due >= 0
    already = 8 - len(sent_at)  # those sent at once by on_read (the full bucket, one in debt)
    assert 1 <= already <= 2
    for n, t in enumerate(sent_at, start=already + 1):
        assert n <= 2 + per_s * t + 1e-9, (n, t)  # never ahead of bucket + rate
    assert sent_at and sent_at[-1] <= (8 - 1) / per_s + 2 * step  # and never much behind
    assert desk.due_in(start + 10) is None
