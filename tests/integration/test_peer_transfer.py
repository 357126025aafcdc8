"""A transfer that asks peers first (rbee.hub.transfer with a PeerBytes source) against the local
Hub server: the Hub takes over where the peers stop, a restart resumes from the peers' bytes,
bytes that fail the Hub's sha256 are thrown away and the peers distrusted, and with --no-hub
what the peers lack is an error. The peers here are one piece faked (the real ones, over CURVE
between namespace hosts, are in test_peer_downloads.py)."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rbee.errors import Canceled, DownloadFailed, ModelNotFound
from rbee.hub import chunks
from rbee.hub.download import DownloadManager
from rbee.hub.files import RemoteFile
from rbee.hub.transfer import Sources
from tests.hub_server import FakeHub, FakeRepo, gguf_blob
from tests.integration.test_hub_download import fast  # noqa: F401  (shrunk timings)

REPO, FILE = "acme/peer-GGUF", "peer-Q4_K_M.gguf"
DATA = gguf_blob(5 * chunks.CHUNK_BYTES + 12345, 7)  # six chunks, the last one short


class Peers:
    """Peers that hold ``data`` and give chunks until ``limit`` of them went out."""

    def __init__(self, data: bytes, limit: int = 1 << 30) -> None:
        self.data, self.limit = data, limit
        self.offsets: list[int] = []
        self.distrusted: list[str] = []
        self.stop_after: int | None = None  # set the stop event after this many chunks
        self.known: list[RemoteFile] = []  # what resolve() says a reference means

    def stream(
        self, remote: RemoteFile, offset: int, stop: threading.Event, note: Callable[[str], None]
    ) -> Iterator[bytes]:
        self.offsets.append(offset)
        note("hive fake")
        sent = 0
        start = offset
        while start < remote.size and sent < self.limit:
            end = min((start // chunks.CHUNK_BYTES + 1) * chunks.CHUNK_BYTES, remote.size)
            yield self.data[start:end]
            sent += 1
            start = end
            if self.stop_after is not None and sent >= self.stop_after:
                stop.set()
                return

    def distrust(self, remote: RemoteFile) -> None:
        self.distrusted.append(remote.filename)

    def resolve(self, reference: str, stop: threading.Event) -> list[RemoteFile]:
        return self.known


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({REPO: FakeRepo({FILE: DATA})}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def pull(models: Path, sources: Sources, cancel: threading.Event | None = None) -> Path:
    with DownloadManager(models) as manager:
        [pulled] = manager.pull(f"hf:{REPO}/{FILE}", None, cancel, sources=sources)
    return pulled.path


def test_the_hub_takes_over_where_peers_stop(hub: FakeHub, tmp_path: Path) -> None:
    peers = Peers(DATA, limit=2)
    sources = Sources(peers)
    path = pull(tmp_path, sources)
    assert path.read_bytes() == DATA
    assert sources.where == "the Hub"
    assert hub.bytes_served(REPO, FILE) == len(DATA) - 2 * chunks.CHUNK_BYTES
    assert [r.range for r in hub.file_gets(REPO, FILE)] == [f"bytes={2 * chunks.CHUNK_BYTES}-"]
    # The chunk list peers will fetch it by describes the verified bytes.
    listed = chunks.load(path, hashlib.sha256(DATA).hexdigest())
    assert listed is not None and listed.count == 6
    assert all(listed.matches(i, DATA[slice(*_range(listed, i))]) for i in range(6))


def _range(listed: chunks.ChunkList, index: int) -> tuple[int, int]:
    start, length = listed.span(index)
    return start, start + length


def test_a_restart_resumes_from_what_peers_gave(hub: FakeHub, tmp_path: Path) -> None:
    peers = Peers(DATA)
    peers.stop_after = 3
    with pytest.raises(Canceled):
        pull(tmp_path, Sources(peers), threading.Event())
    path = pull(tmp_path, Sources(Peers(DATA)))  # a new hive process: new peers, same part
    assert path.read_bytes() == DATA and hub.bytes_served(REPO, FILE) == 0
    second = Peers(DATA)
    assert pull(tmp_path, Sources(second)) == path and second.offsets == []  # already there


def test_a_resume_starts_at_the_part_files_end(hub: FakeHub, tmp_path: Path) -> None:
    first = Peers(DATA)
    first.stop_after = 2
    with pytest.raises(Canceled):
        pull(tmp_path, Sources(first), threading.Event())
    again = Peers(DATA)
    pull(tmp_path, Sources(again))
    assert again.offsets == [2 * chunks.CHUNK_BYTES]


def test_peer_bytes_that_fail_the_sha256_are_fetched_again_from_the_hub(
    hub: FakeHub, tmp_path: Path
) -> None:
    liar = Peers(gguf_blob(len(DATA), 8))  # consistent with itself, not the Hub's file
    path = pull(tmp_path, Sources(liar))
    assert path.read_bytes() == DATA
    assert liar.distrusted == [FILE]
    assert hub.bytes_served(REPO, FILE) == len(DATA)


def test_without_the_hub_what_peers_lack_is_an_error(hub: FakeHub, tmp_path: Path) -> None:
    peers = Peers(DATA, limit=1)
    with pytest.raises(ModelNotFound, match="no hive in reach holds"):
        pull(tmp_path, Sources(peers, hub=False))  # no peer knows the reference
    commit, sha = hub.repos[REPO].commit, hashlib.sha256(DATA).hexdigest()
    url = f"{hub.endpoint}/{REPO}/resolve/{commit}/{FILE}"
    peers.known = [RemoteFile(REPO, FILE, commit, len(DATA), sha, url)]
    with pytest.raises(DownloadFailed, match="no peer in reach holds the rest"):
        pull(tmp_path, Sources(peers, hub=False))
    assert hub.bytes_served(REPO, FILE) == 0 and not hub.requests  # not even metadata


def test_chunk_hashes_do_not_depend_on_how_the_bytes_arrive() -> None:
    whole = chunks.ChunkHasher()
    whole.update(DATA)
    pieces = chunks.ChunkHasher()
    cuts = [
        0,
        1,
        4095,
        chunks.CHUNK_BYTES,
        chunks.CHUNK_BYTES + 7,
        3 * chunks.CHUNK_BYTES,
        len(DATA),
    ]
    for a, b in itertools.pairwise(cuts):
        pieces.update(DATA[a:b])
    assert whole.finish() == pieces.finish()
    listed = whole.finish()
    assert listed.valid() and listed.count == 6
    assert not listed.matches(5, DATA[-12345:-1] + b"x")


def test_a_chunk_list_is_only_good_for_the_file_it_was_made_for(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(DATA)
    hasher = chunks.ChunkHasher()
    hasher.update(DATA)
    sha = hashlib.sha256(DATA).hexdigest()
    chunks.save(path, hasher.finish(), sha)
    assert chunks.load(path, sha) == hasher.finish()
    assert chunks.load(path, "0" * 64) is None  # another file's sha256
    path.write_bytes(DATA[:-1] + b"\0")  # replaced since: a new mtime
    assert chunks.load(path, sha) is None
    chunks.forget(path)
    assert not chunks.chunks_path(path).exists()
