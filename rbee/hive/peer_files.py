"""Fetching a model file from peer hives first: every trusted hive in reach that holds it, a few
chunks at a time from each, every chunk checked before it is written.

A hive asks only hives it paired with as hives (their keys pinned in ``known_hives``, found by
mDNS), over CURVE with its own key; they answer to keys they gave the ``hive`` or ``admin``
role (rbee.hive.sharing). The chunk list comes from the holders: the list most of them agree
on is used, a holder whose list differs is left out. A chunk that does not match its hash bans
the peer that sent it (for BAN_S), and the chunk is asked again elsewhere; a peer that answers
nothing for PEER_SILENCE_S while it owes chunks is dropped. Chunks are written in order (those
that come early wait in memory, at most WINDOW of them), so the part file is always a verified
prefix: the Hub's ranged download can take over from it, and a restart resumes it.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zmq

from rbee import log
from rbee.errors import RbeeError
from rbee.hive.peers import Peer
from rbee.hub.chunks import ChunkList
from rbee.hub.files import RemoteFile
from rbee.protocol.messages import ChunkData, Error, FileHeld, FileQuery, Frame, ReadChunk
from rbee.transport.keys import KeyPair
from rbee.transport.sockets import Curve, DealerClient

logger = log.get(__name__)

QUERY_S = 3.0  # how long holders have to answer FileQuery
PEER_SILENCE_S = 6.0  # a peer owing chunks that sends nothing this long is dropped
DEPTH = 3  # chunk requests in flight per peer: keeps the link busy across round trips
WINDOW = 16  # chunks fetched ahead of the next one to write (16 × 4 MiB in memory at most)
BAN_S = 3600.0
POLL_MS = 100


class PeerFiles:
    """Peer hives as a source of model files (rbee.hub.transfer.PeerBytes), with their bans."""

    def __init__(self, keys: KeyPair, find: Callable[[], list[Peer]]) -> None:
        self.keys = keys
        self.find = find
        self.bans: dict[str, tuple[float, str]] = {}  # key → (until, why)
        self.listed_by: dict[str, list[Peer]] = {}  # sha256 → the peers whose list was used
        self._lock = threading.Lock()

    def ban(self, peer: Peer, why: str) -> None:
        """Ask ``peer`` for nothing for BAN_S."""
        logger.warning("peer banned", peer=peer.node, reason=why, for_s=BAN_S)
        with self._lock:
            self.bans[peer.key] = (time.monotonic() + BAN_S, why)

    def banned(self, peer: Peer) -> bool:
        """Whether ``peer`` is banned now."""
        with self._lock:
            ban = self.bans.get(peer.key)
        return ban is not None and ban[0] > time.monotonic()

    def candidates(self) -> list[Peer]:
        """Trusted hives in reach that are not banned."""
        return [p for p in self.find() if not self.banned(p)]

    def stream(
        self, remote: RemoteFile, offset: int, stop: threading.Event, note: Callable[[str], None]
    ) -> Iterator[bytes]:
        """``remote``'s bytes from ``offset`` on, from peers, in order; ends early when no peer
        can give more (the caller goes on from the Hub)."""
        if remote.sha256 is None or offset >= remote.size:
            return
        peers = self.candidates()
        if not peers:
            return
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        fetch = _Fetch(self, ctx, remote, stop, note)
        try:
            fetch.ask(peers)
            yield from fetch.run(offset)
        finally:
            fetch.close()
            ctx.destroy(linger=0)

    def distrust(self, remote: RemoteFile) -> None:
        """The peers whose chunk list gave bytes that failed the Hub's sha256: banned."""
        for peer in self.listed_by.pop(remote.sha256 or "", []):
            self.ban(peer, f"its copy of {remote.filename} fails the Hub's sha256")

    def resolve(self, reference: str, stop: threading.Event) -> list[RemoteFile]:
        """The file a reference means, as a peer that holds it recorded it (for a Hub that is
        out of reach): its repo, commit, size and the Hub's sha256."""
        from huggingface_hub import hf_hub_url

        from rbee.hub.client import hub_endpoint

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        fetch = _Fetch(self, ctx, None, stop, lambda _: None)
        try:
            for peer, held in fetch.query(self.candidates(), FileQuery(reference=reference)):
                url = hf_hub_url(
                    held.repo, held.filename, revision=held.commit, endpoint=hub_endpoint()
                )
                try:
                    remote = RemoteFile(
                        held.repo, held.filename, held.commit, held.size, held.sha256, url
                    )
                except RbeeError as exc:
                    logger.info("peer described a file unusably", peer=peer.node, error=str(exc))
                    continue
                logger.info("resolved by a peer", reference=reference, peer=peer.node)
                return [remote]
            return []
        finally:
            fetch.close()
            ctx.destroy(linger=0)


@dataclass(eq=False)
class _Source:
    """One peer during one fetch: its connection and the chunks it owes."""

    peer: Peer
    client: DealerClient
    owed: dict[int, int] = field(default_factory=dict)  # request id → chunk index
    heard: float = field(default_factory=time.monotonic)
    got: int = 0  # bytes it gave


class _Fetch:
    """One file from several peers (its own ZeroMQ context, on the pull's thread)."""

    def __init__(
        self,
        owner: PeerFiles,
        ctx: zmq.Context[zmq.Socket[bytes]],
        remote: RemoteFile | None,
        stop: threading.Event,
        note: Callable[[str], None],
    ) -> None:
        self.owner, self.ctx, self.remote, self.stop, self.note = owner, ctx, remote, stop, note
        self.sources: list[_Source] = []
        self.chunks: ChunkList | None = None
        self.retry: list[int] = []  # a heap of chunk indexes to ask again
        self.done: dict[int, bytes] = {}

    def close(self) -> None:
        for source in self.sources:
            source.client.close()
        self.sources.clear()

    def query(self, peers: list[Peer], frame: FileQuery) -> Iterator[tuple[Peer, FileHeld]]:
        """Ask every peer at once; yield (peer, answer) for those that hold the file."""
        asked: dict[int, _Source] = {}
        for peer in peers:
            try:
                client = DealerClient(self.ctx, peer.endpoint, self._curve(peer))
                source = _Source(peer, client)
                asked[client.send(frame)] = source
            except RbeeError as exc:
                logger.info("peer not asked", peer=peer.node, error=str(exc))
                continue
            self.sources.append(source)
        deadline = time.monotonic() + QUERY_S
        waiting = set(asked.values())
        while waiting and time.monotonic() < deadline and not self.stop.is_set():
            self._poll(waiting)
            for source in list(waiting):
                for rid, answer in self._take(source):
                    if asked.get(rid) is source:
                        waiting.discard(source)
                        if isinstance(answer, FileHeld) and answer.held:
                            yield source.peer, answer
                        else:
                            why = answer.reason if isinstance(answer, FileHeld) else "refused"
                            logger.debug("peer does not hold it", peer=source.peer.node, why=why)
                if source not in self.sources:  # its handshake failed
                    waiting.discard(source)

    def ask(self, peers: list[Peer]) -> None:
        """Find the holders of the file and agree on its chunk list."""
        remote = self.remote
        assert remote is not None and remote.sha256 is not None
        frame = FileQuery(
            repo=remote.repo, commit=remote.commit, filename=remote.filename, sha256=remote.sha256
        )
        lists: dict[Peer, ChunkList] = {}
        for peer, held in self.query(peers, frame):
            listed = ChunkList(held.size, held.chunk_bytes, held.hashes)
            if held.sha256 == remote.sha256 and held.size == remote.size and listed.valid():
                lists[peer] = listed
            else:
                logger.warning("peer described the file unlike the Hub", peer=peer.node)
        if not lists:
            self.close()
            return
        votes = Counter((c.chunk_bytes, c.hashes) for c in lists.values())
        (chunk_bytes, hashes), _ = votes.most_common(1)[0]
        self.chunks = ChunkList(remote.size, chunk_bytes, hashes)
        holders = [
            p for p, c in lists.items() if (c.chunk_bytes, c.hashes) == (chunk_bytes, hashes)
        ]
        for peer in lists.keys() - set(holders):
            logger.warning("peer's chunk list disagrees with the others'", peer=peer.node)
        self.owner.listed_by[remote.sha256] = holders
        keep = [s for s in self.sources if s.peer in holders]
        for source in self.sources:
            if source not in keep:
                source.client.close()
        self.sources = keep

    def run(self, offset: int) -> Iterator[bytes]:
        """Yield the file from ``offset`` on, in order, while any holder is left."""
        chunks, remote = self.chunks, self.remote
        if chunks is None or remote is None:
            return
        first = offset // chunks.chunk_bytes
        emit = next_new = first
        started, moved = time.monotonic(), 0
        while emit < chunks.count and self.sources and not self.stop.is_set():
            self.note("hive " + ", ".join(sorted(s.peer.node for s in self.sources)))
            next_new = self._send(emit, next_new, chunks.count)
            self._poll(self.sources)
            for source in list(self.sources):
                self._receive(source, emit)
            while emit in self.done:
                data = self.done.pop(emit)
                start = emit * chunks.chunk_bytes
                moved += len(data)
                yield data[offset - start :] if start < offset else data
                emit += 1
        took = time.monotonic() - started
        given = {s.peer.node: s.got for s in self.sources}
        logger.info(
            "fetched from peers",
            file=remote.filename,
            bytes=moved,
            mb_per_s=round(moved / took / 1e6, 1) if took > 0 else 0,
            complete=emit >= chunks.count,
            still_giving=given,
        )

    def _send(self, emit: int, next_new: int, count: int) -> int:
        """Give every source DEPTH chunks to send: ones to ask again first, then new ones no
        further than WINDOW ahead of the next to write. Returns the next new index."""
        for source in sorted(self.sources, key=lambda s: len(s.owed)):
            while len(source.owed) < DEPTH:
                if self.retry:
                    index = heapq.heappop(self.retry)
                elif next_new < min(count, emit + WINDOW):
                    index, next_new = next_new, next_new + 1
                else:
                    return next_new
                assert self.remote is not None and self.remote.sha256 is not None
                rid = source.client.send(ReadChunk(sha256=self.remote.sha256, index=index))
                if not source.owed:
                    source.heard = time.monotonic()  # silence counts from the first request
                source.owed[rid] = index
        return next_new

    def _receive(self, source: _Source, emit: int) -> None:
        chunks = self.chunks
        assert chunks is not None
        for rid, frame in self._take(source):
            index = source.owed.pop(rid, None)
            if index is None:
                continue  # an answer to a request given up on
            if isinstance(frame, ChunkData) and frame.index == index:
                if not chunks.matches(index, frame.data):
                    self.owner.ban(source.peer, f"chunk {index} did not match its hash")
                    self._drop(source, f"chunk {index} did not match its hash", [index])
                    return
                source.got += len(frame.data)
                if index >= emit:
                    self.done[index] = frame.data
            else:
                why = frame.message if isinstance(frame, Error) else f"sent {frame.TYPE}"
                self._drop(source, why, [index])
                return
        if source.owed and time.monotonic() - source.heard > PEER_SILENCE_S:
            self._drop(source, f"sent nothing for {PEER_SILENCE_S:.0f} s", [])

    def _take(self, source: _Source) -> Iterator[tuple[int, Frame]]:
        """The frames that have arrived from ``source`` (a refused handshake drops it)."""
        while True:
            try:
                envelope = source.client.take()
            except RbeeError as exc:
                self._drop(source, exc.message, [])
                return
            if envelope is None:
                return
            source.heard = time.monotonic()
            yield envelope.rid, envelope.frame

    def _drop(self, source: _Source, why: str, also: list[int]) -> None:
        """Stop asking ``source``; what it owed is asked of the others."""
        if source not in self.sources:
            return
        logger.warning("peer dropped from a download", peer=source.peer.node, reason=why)
        for index in [*source.owed.values(), *also]:
            heapq.heappush(self.retry, index)
        source.owed.clear()
        source.client.close()
        self.sources.remove(source)

    def _poll(self, sources: list[_Source] | set[_Source]) -> None:
        poller = zmq.Poller()
        for source in sources:
            for sock in source.client.pollables():
                poller.register(sock, zmq.POLLIN)
        poller.poll(POLL_MS)

    def _curve(self, peer: Peer) -> Curve:
        return Curve(self.owner.keys.public, self.owner.keys.secret, peer.key)
