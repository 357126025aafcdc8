"""A fake Hugging Face Hub on 127.0.0.1 for tests: the routes huggingface_hub and rbee use.

* ``GET /api/models/ORG/REPO[/revision/REV]`` — model_info (``?blobs=True`` adds each file's
  size, blobId and LFS sha256/size/pointerSize), with the Hub's ``X-Error-Code`` headers
  (RepoNotFound, RevisionNotFound) that huggingface_hub turns into its error classes;
* ``HEAD|GET /ORG/REPO/resolve/REV/PATH`` — a git file is served directly (ETag = blob sha1);
  an LFS file (``*.gguf``) gets a 302 to ``/lfs-blobs/SHA256`` on ``redirect_host`` (default
  ``localhost``: another host than the endpoint's 127.0.0.1, like the Hub's CDN), with
  X-Repo-Commit, X-Linked-Size and X-Linked-Etag; gated repos answer 403 GatedRepo without the
  right token; missing files 404 EntryNotFound;
* ``HEAD|GET /lfs-blobs/SHA256`` — the bytes, with ``Range: bytes=N-[M]`` → 206 + Content-Range.

Fault knobs (``FakeHub.faults``) act on file bodies: cut the connection after N body bytes
(``cut_times`` responses, -1: all), stall mid-body, ignore Range or answer the wrong range,
serve corrupted bytes, answer a status code; ``FakeHub.unstall`` ends stalls on demand, so a
test can hold a transfer mid-file exactly as long as it needs. Every request is recorded
(method, path, host, Range, Authorization present?, status, body bytes sent) so tests can
assert what went over the wire.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import huggingface_hub

BODY_CHUNK_BYTES = 64 * 1024
SERVER_STOP_TIMEOUT_S = 5.0
HANDLER_IDLE_TIMEOUT_S = 10.0  # an idle keep-alive connection's handler thread ends after this
POINTER_SIZE = 134


def gguf_blob(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that start with a tiny valid GGUF header, then seeded random padding."""
    key, value = b"general.architecture", b"llama"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    header += struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(value)) + value
    assert size >= len(header)
    return header + random.Random(seed).randbytes(size - len(header))


_DIGESTS: dict[bytes, tuple[str, str]] = {}  # bytes cache their hash: a cheap key
_DIGESTS_LOCK = threading.Lock()


def _digests(data: bytes) -> tuple[str, str]:
    with _DIGESTS_LOCK:
        found = _DIGESTS.get(data)
    if found is None:
        blob = hashlib.sha1(b"blob %d\0" % len(data))
        blob.update(data)
        found = (hashlib.sha256(data).hexdigest(), blob.hexdigest())
        with _DIGESTS_LOCK:
            _DIGESTS[data] = found
    return found


def sha256_hex(data: bytes) -> str:
    """The sha256 the Hub reports for an LFS file (computed once per content)."""
    return _digests(data)[0]


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 the Hub reports as blobId (and ETag) of a file kept in git."""
    return _digests(data)[1]


@dataclass
class FakeRepo:
    """A repo: files by path, the commit ``main`` points at, other refs, access rules."""

    files: dict[str, bytes]
    commit: str = ""
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag → commit, besides main
    gated: bool = False  # files need the server's token (403 GatedRepo otherwise)
    private: bool = False  # everything needs the token (401 RepoNotFound otherwise)
    git_files: set[str] = field(default_factory=set)  # GGUFs kept in git, not LFS

    def is_lfs(self, name: str) -> bool:
        return name.lower().endswith(".gguf") and name not in self.git_files


@dataclass
class Faults:
    """Misbehaviour of file bodies (both direct and /lfs-blobs)."""

    cut_after_bytes: int | None = None  # close the connection after this many body bytes
    cut_times: int = 1  # responses to cut; -1: every one
    stall_after_bytes: int | None = None  # then send nothing for stall_s
    stall_s: float = 0.0
    stall_times: int = 1
    ignore_range: bool = False  # answer a Range request with 200 and the whole file
    wrong_range_times: int = 0  # answer a Range request with 206 from byte 0
    corrupt: set[str] = field(default_factory=set)  # file paths served with one byte flipped
    status: int | None = None  # answer file requests with this status
    status_times: int = 1


@dataclass
class Request:
    """One request the fake Hub saw (recorded on arrival; status and bytes as they happen)."""

    method: str
    path: str
    host: str
    range: str | None
    authorized: bool  # an Authorization header was present
    status: int
    body_bytes: int  # body bytes actually written


class FakeHub:
    """The server; use as a context manager. ``endpoint`` goes into HF_ENDPOINT."""

    def __init__(
        self,
        repos: dict[str, FakeRepo],
        *,
        token: str | None = None,
        redirect_host: str = "localhost",
        host: str = "127.0.0.1",
    ) -> None:
        """``host``: the address to listen on (a namespace host's, for hives in namespaces)."""
        self.repos = repos
        for repo_id, repo in repos.items():
            if not repo.commit:
                repo.commit = hashlib.sha1(repo_id.encode()).hexdigest()
        self.token = token
        self.redirect_host = redirect_host
        self.faults = Faults()
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.unstall = threading.Event()  # set: every stall ends now (and later ones at once)
        self.connections: set[socket.socket] = set()
        self.server = ThreadingHTTPServer((host, 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.unstall.set()
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(SERVER_STOP_TIMEOUT_S)
        # huggingface_hub's one process-wide client keeps its keep-alive connections to this
        # server in its pool (half-closed now); dropping it closes them with the server.
        huggingface_hub.close_session()

    # ------------------------------------------------------------------ what tests look at

    def sha256(self, repo_id: str, name: str) -> str:
        return sha256_hex(self.repos[repo_id].files[name])

    def file_gets(self, repo_id: str, name: str) -> list[Request]:
        """The GETs that carried bytes of one file (direct or through /lfs-blobs)."""
        repo = self.repos[repo_id]
        paths = {f"/lfs-blobs/{sha256_hex(repo.files[name])}"}
        paths |= {f"/{repo_id}/resolve/{rev}/{name}" for rev in ("main", repo.commit)}
        with self.lock:
            return [
                r
                for r in self.requests
                if r.method == "GET" and r.path in paths and r.status in (200, 206)
            ]

    def bytes_served(self, repo_id: str, name: str) -> int:
        return sum(r.body_bytes for r in self.file_gets(repo_id, name))

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    # ------------------------------------------------------------------ lookups

    def find_blob(self, sha256: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if sha256_hex(data) == sha256:
                    return name, data
        return None

    def resolve(self, repo: FakeRepo, revision: str) -> str | None:
        if revision in ("main", repo.commit):
            return repo.commit
        return repo.refs.get(revision)

    def take(self, attr: str) -> bool:
        """Consume one use of a counted fault (``<name>_times``); True if it applies."""
        with self.lock:
            left = getattr(self.faults, attr)
            if left == 0:
                return False
            if left > 0:
                setattr(self.faults, attr, left - 1)
            return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = HANDLER_IDLE_TIMEOUT_S
    server: ThreadingHTTPServer
    record: Request

    @property
    def hub(self) -> FakeHub:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        return hub

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub.connections.add(self.connection)

    def finish(self) -> None:
        with self.hub.lock:
            self.hub.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``FakeHub.requests`` instead."""

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    # ------------------------------------------------------------------ routing

    def _route(self) -> None:
        path = urlsplit(self.path).path
        self.record = Request(
            self.command,
            path,
            self.headers.get("Host", ""),
            self.headers.get("Range"),
            "Authorization" in self.headers,
            0,
            0,
        )
        with self.hub.lock:
            self.hub.requests.append(self.record)
        try:
            parts = [unquote(p) for p in path.split("/")[1:]]
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._model_info(parts[2:])
            elif len(parts) >= 2 and parts[0] == "lfs-blobs":
                self._lfs_blob(parts[1])
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self._error(404, "no such route")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in this server: answer 500 rather than hang a client
            self.close_connection = True
            if self.record.status == 0:
                self._error(500, f"fake hub bug: {exc!r}")
            raise

    def _authorized(self) -> bool:
        token = self.hub.token
        return token is not None and self.headers.get("Authorization") == f"Bearer {token}"

    def _model_info(self, parts: list[str]) -> None:
        repo_id = "/".join(parts[:2])
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(401 if repo is not None else 404, "Repository not found", "RepoNotFound")
            return
        revision = parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
        commit = self.hub.resolve(repo, revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return
        siblings = []
        for name, data in repo.files.items():
            sibling: dict[str, Any] = {
                "rfilename": name,
                "size": len(data),
                "blobId": git_blob_id(data),
            }
            if repo.is_lfs(name):
                sibling["size"] = len(data)
                sibling["lfs"] = {
                    "sha256": sha256_hex(data),
                    "size": len(data),
                    "pointerSize": POINTER_SIZE,
                }
            siblings.append(sibling)
        body = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in repo.files.values()),
        }
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, revision: str, name: str) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(401 if repo is not None else 404, "Repository not found", "RepoNotFound")
            return
        commit = self.hub.resolve(repo, revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return
        data = repo.files.get(name)
        if data is None:
            self._error(404, "Entry not found", "EntryNotFound")
            return
        if repo.gated and not self._authorized():
            self._error(403, "Access to this model is restricted", "GatedRepo")
            return
        headers = {"X-Repo-Commit": commit}
        if repo.is_lfs(name):
            sha256 = sha256_hex(data)
            location = f"http://{self.hub.redirect_host}:{self.hub.port}/lfs-blobs/{sha256}"
            headers |= {
                "Location": location,
                "ETag": f'"{sha256}"',
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
            }
            self._send(302, b"", headers)
            return
        self._file(name, data, headers | {"ETag": f'"{git_blob_id(data)}"'})

    def _lfs_blob(self, sha256: str) -> None:
        found = self.hub.find_blob(sha256)
        if found is None:
            self._error(404, "no such blob")
            return
        name, data = found
        self._file(name, data, {"ETag": f'"{sha256}"'})

    # ------------------------------------------------------------------ responses

    def _file(self, name: str, data: bytes, headers: dict[str, str]) -> None:
        faults = self.hub.faults
        if faults.status is not None and self.command == "GET" and self.hub.take("status_times"):
            self._error(faults.status, "injected failure")
            return
        if name in faults.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, end, status = 0, len(data), 200
        wanted = self.headers.get("Range")
        if wanted and not faults.ignore_range:
            span = _parse_range(wanted, len(data))
            if span is None:
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            start, end, status = span[0], span[1], 206
            if self.hub.take("wrong_range_times"):
                start = 0
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self.record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        for chunk in self._body(data, start, end):
            self.wfile.write(chunk)
            self.record.body_bytes += len(chunk)

    def _body(self, data: bytes, start: int, end: int) -> Iterator[bytes]:
        """The body in chunks, cut or stalled as the faults say."""
        faults, hub = self.hub.faults, self.hub
        cut = faults.cut_after_bytes if faults.cut_after_bytes is not None else None
        cut = cut if cut is not None and cut < end - start and hub.take("cut_times") else None
        stall = faults.stall_after_bytes
        stall = (
            stall if stall is not None and stall < end - start and hub.take("stall_times") else None
        )
        sent = 0
        while start + sent < end:
            limit = end - start
            for mark in (cut, stall):
                if mark is not None and sent < mark:
                    limit = min(limit, mark)
            size = min(BODY_CHUNK_BYTES, limit - sent)
            yield data[start + sent : start + sent + size]
            sent += size
            if cut is not None and sent >= cut:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if stall is not None and sent == stall:
                self.wfile.flush()
                hub.unstall.wait(faults.stall_s)
                if hub.stopping.is_set():
                    return

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self.record.body_bytes += len(body)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """[start, end) of ``bytes=N-`` or ``bytes=N-M``; None if unsatisfiable or malformed."""
    unit, _, span = value.partition("=")
    first, _, last = span.partition("-")
    if unit.strip() != "bytes" or not first.isdigit():
        return None
    start = int(first)
    end = min(int(last) + 1, size) if last.isdigit() else size
    if start >= size or end <= start:
        return None
    return start, end
