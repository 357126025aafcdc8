"""rbee.hub against a local fake Hub (tests/hub_server.py), with the real huggingface_hub.

HF_ENDPOINT points at 127.0.0.1; the fake Hub redirects LFS files to "localhost", a different
host, as the real Hub redirects to its CDN. Timing constants are shrunk instead of sleeping.
"""

from __future__ import annotations

import fcntl
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from rbee.errors import (
    AccessDenied,
    Canceled,
    ChecksumMismatch,
    DownloadFailed,
    InsufficientDisk,
    ModelAmbiguous,
    ModelNotFound,
)
from rbee.hub import client, download, layout, transfer
from rbee.hub.download import DownloadManager, PulledFile, pull
from rbee.hub.layout import part_path, sidecar_path
from tests.hub_server import FakeHub, FakeRepo, gguf_blob

MB = 1_000_000
TINY = "acme/tiny-GGUF"
SPLIT = "acme/split-GGUF"
GATED = "acme/gated-GGUF"
PRIVATE = "acme/private-GGUF"
SMALL = "acme/small-GGUF"
TOKEN = "hf_test_token"
Q4, Q8, F16 = "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "sub/tiny-F16.gguf"
PARTS = [f"big-Q4_K_M-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
FILES = {
    TINY: {
        "README.md": b"# tiny\n",
        "config.json": b"{}",
        Q4: gguf_blob(3 * MB, 1),
        Q8: gguf_blob(2 * MB, 2),
        F16: gguf_blob(1 * MB, 3),
    },
    SPLIT: {name: gguf_blob(600_000, 10 + i) for i, name in enumerate(PARTS)},
    GATED: {"gated-Q4_K_M.gguf": gguf_blob(500_000, 20)},
    PRIVATE: {"private-Q4_K_M.gguf": gguf_blob(100_000, 30)},
    SMALL: {"small-Q4_K_M.gguf": gguf_blob(200_000, 40)},  # kept in git: no LFS sha256
    "acme/no-gguf": {"model.safetensors": b"x" * 100, "README.md": b"hi"},
}


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_repos() -> dict[str, FakeRepo]:
    repos = {
        name: FakeRepo(dict(files), commit=hashlib.sha1(name.encode()).hexdigest())
        for name, files in FILES.items()
    }
    repos[TINY].refs["v1.0"] = repos[TINY].commit
    repos[GATED].gated = True
    repos[PRIVATE].private = True
    repos[SMALL].git_files = {"small-Q4_K_M.gguf"}
    return repos


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Shrunk timing constants, no Hub token from the environment or a token file, and a
    check that every transfer thread ended with its test."""
    monkeypatch.setattr(transfer, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setattr(transfer, "BACKOFF_MAX_S", 0.05)
    monkeypatch.setattr(transfer, "PROGRESS_INTERVAL_S", 0.05)
    monkeypatch.setattr(client, "API_BACKOFF_S", 0.01)
    monkeypatch.setattr(download, "WAIT_POLL_S", 0.02)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("rbee-download-")]
    assert not left, f"download threads outlived the test: {left}"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(make_repos(), token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


def assert_pulled(hub: FakeHub, f: PulledFile, repo: str, name: str) -> None:
    data = hub.repos[repo].files[name]
    assert (f.repo, f.filename, f.commit, f.size) == (repo, name, hub.repos[repo].commit, len(data))
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert f.path.read_bytes() == data
    assert not part_path(f.path).exists() and not sidecar_path(f.path).exists()


def ranges(hub: FakeHub, repo: str, name: str) -> list[str | None]:
    return [r.range for r in hub.file_gets(repo, name)]


# --------------------------------------------------------------------------- reference forms


def test_pull_default_quant(hub: FakeHub, models: Path) -> None:
    calls: list[tuple[int, int, float, float | None]] = []
    [f] = pull(f"hf:{TINY}", models, lambda *a: calls.append(a))
    assert_pulled(hub, f, TINY, Q4)
    assert f.reference == f"hf:{TINY}"
    commit = hub.repos[TINY].commit
    assert f.path == models.resolve() / "hf" / "acme--tiny-GGUF" / commit / Q4
    assert calls[-1][:2] == (3 * MB, 3 * MB) and calls[-1][3] == 0.0
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert all(total == 3 * MB for _, total, _, _ in calls)
    [get] = hub.file_gets(TINY, Q4)
    assert get.host.startswith("localhost:") and get.range is None


def test_pull_bare_reference_with_lowercase_quant(hub: FakeHub, models: Path) -> None:
    [f] = pull(f"{TINY}:q8_0", models)
    assert_pulled(hub, f, TINY, Q8)
    assert f.reference == f"hf:{TINY}:Q8_0"


def test_pull_exact_file_in_a_subfolder(hub: FakeHub, models: Path) -> None:
    [f] = pull(f"hf:{TINY}/{F16}", models)
    assert_pulled(hub, f, TINY, F16)
    assert f.path.parent.name == "sub"


def test_pull_at_a_tag_and_at_a_commit(hub: FakeHub, models: Path) -> None:
    commit = hub.repos[TINY].commit
    [tagged] = pull(f"hf:{TINY}:Q8_0@v1.0", models)
    [pinned] = pull(f"hf:{TINY}:Q8_0@{commit}", models)
    assert tagged.commit == pinned.commit == commit and tagged.path == pinned.path
    paths = [r.path for r in hub.requests if r.path.startswith("/api/")]
    assert paths == [f"/api/models/{TINY}/revision/v1.0", f"/api/models/{TINY}/revision/{commit}"]
    assert len(hub.file_gets(TINY, Q8)) == 1  # the second pull found the file in place


def test_unknown_revision(hub: FakeHub, models: Path) -> None:
    with pytest.raises(ModelNotFound, match="no revision 'v9'"):
        pull(f"hf:{TINY}@v9", models)


def test_pull_split_model(hub: FakeHub, models: Path) -> None:
    calls: list[tuple[int, int, float, float | None]] = []
    pulled = pull(f"hf:{SPLIT}", models, lambda *a: calls.append(a))
    assert [f.filename for f in pulled] == PARTS
    for f in pulled:
        assert_pulled(hub, f, SPLIT, f.filename)
    assert len({f.path.parent for f in pulled}) == 1
    assert all(total == 1_800_000 for _, total, _, _ in calls)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert calls[-1][0] == 1_800_000


def test_a_second_pull_transfers_nothing(hub: FakeHub, models: Path) -> None:
    [first] = pull(f"hf:{TINY}", models)
    hub.clear()
    [again] = pull(f"hf:{TINY}", models)
    assert again == first
    assert hub.file_gets(TINY, Q4) == []


# --------------------------------------------------------------------------- errors


def test_missing_repo(hub: FakeHub, models: Path) -> None:
    with pytest.raises(ModelNotFound, match="no repo acme/nope"):
        pull("hf:acme/nope", models)


def test_repo_without_gguf(hub: FakeHub, models: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"has no GGUF file.*model\.safetensors"):
        pull("hf:acme/no-gguf", models)


def test_ambiguous_quant(hub: FakeHub, models: Path) -> None:
    hub.repos[TINY].files["other/tiny-Q8_0.gguf"] = gguf_blob(1000, 5)
    with pytest.raises(ModelAmbiguous, match=r"other/tiny-Q8_0\.gguf"):
        pull(f"hf:{TINY}:Q8_0", models)


def test_gated_repo_needs_a_token(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AccessDenied) as excinfo:
        pull(f"hf:{GATED}", models)
    assert "HF_TOKEN" in excinfo.value.suggestion
    assert not list(models.rglob("*.gguf"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    [f] = pull(f"hf:{GATED}", models)
    assert_pulled(hub, f, GATED, "gated-Q4_K_M.gguf")


def test_token_goes_to_the_hub_only_never_to_the_redirect_host(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pull(f"hf:{TINY}", models)
    hub_requests = [r for r in hub.requests if r.host.startswith("127.0.0.1:")]
    cdn_requests = [r for r in hub.requests if r.host.startswith("localhost:")]
    assert {r.path.split("/")[1] for r in hub_requests} == {"api", "acme"}
    assert hub_requests and all(r.authorized for r in hub_requests)
    assert cdn_requests and not any(r.authorized for r in cdn_requests)


def test_private_repo_needs_a_token(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelNotFound, match="or it is private") as excinfo:
        pull(f"hf:{PRIVATE}", models)
    assert "HF_TOKEN" in excinfo.value.suggestion
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    [f] = pull(f"hf:{PRIVATE}", models)
    assert_pulled(hub, f, PRIVATE, "private-Q4_K_M.gguf")


def test_offline_mode_is_not_retried(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadFailed, match="HF_HUB_OFFLINE") as excinfo:
        pull(f"hf:{TINY}", models)
    assert not excinfo.value.retryable
    assert hub.requests == []


def test_hub_unreachable(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(DownloadFailed, match="cannot reach the Hub") as excinfo:
        pull(f"hf:{TINY}", models)
    assert excinfo.value.retryable


def test_checksum_mismatch_leaves_nothing(hub: FakeHub, models: Path) -> None:
    hub.faults.corrupt = {Q4}
    with pytest.raises(ChecksumMismatch) as excinfo:
        pull(f"hf:{TINY}", models)
    assert hub.sha256(TINY, Q4) in excinfo.value.message
    leftovers = [p for p in models.rglob("*") if p.is_file()]
    assert leftovers == []


def test_a_file_kept_in_git_is_verified_by_its_blob_id(hub: FakeHub, models: Path) -> None:
    [f] = pull(f"hf:{SMALL}", models)
    assert_pulled(hub, f, SMALL, "small-Q4_K_M.gguf")
    assert not any(r.path.startswith("/lfs-blobs/") for r in hub.requests)
    f.path.unlink()
    hub.faults.corrupt = {"small-Q4_K_M.gguf"}
    with pytest.raises(ChecksumMismatch, match="git blob sha1"):
        pull(f"hf:{SMALL}", models)


def test_a_broken_progress_callback_does_not_break_the_download(hub: FakeHub, models: Path) -> None:
    calls: list[int] = []

    def broken(done: int, total: int, rate: float, eta: float | None) -> None:
        calls.append(done)
        raise RuntimeError("display gone")

    [f] = pull(f"hf:{TINY}", models, broken)
    assert_pulled(hub, f, TINY, Q4)
    assert len(calls) == 1  # dropped after it failed


def test_insufficient_disk_before_any_transfer(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout, "disk_free_bytes", lambda path: 2 * MB)
    with pytest.raises(InsufficientDisk) as excinfo:
        pull(f"hf:{TINY}", models)
    assert f"needs {3 * MB + layout.DISK_MARGIN_BYTES} bytes" in excinfo.value.message
    assert f"only {2 * MB} are free" in excinfo.value.message
    assert hub.file_gets(TINY, Q4) == []
    assert not [r for r in hub.requests if "/resolve/" in r.path]


def test_file_request_404_is_not_retried(hub: FakeHub, models: Path) -> None:
    hub.faults.status, hub.faults.status_times = 404, -1
    with pytest.raises(ModelNotFound, match="HTTP 404"):
        pull(f"hf:{TINY}", models)
    assert len([r for r in hub.requests if r.path.startswith("/lfs-blobs/")]) == 1


def test_server_errors_are_retried(hub: FakeHub, models: Path) -> None:
    hub.faults.status, hub.faults.status_times = 503, 2
    [f] = pull(f"hf:{TINY}", models)
    assert_pulled(hub, f, TINY, Q4)
    statuses = [r.status for r in hub.requests if r.path.startswith("/lfs-blobs/")]
    assert statuses == [503, 503, 200]


def test_retries_are_bounded(hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "MAX_FAILED_ATTEMPTS", 3)
    hub.faults.status, hub.faults.status_times = 500, -1
    with pytest.raises(DownloadFailed, match="failed 3 times in a row") as excinfo:
        pull(f"hf:{TINY}", models)
    assert excinfo.value.retryable


# --------------------------------------------------------------------------- resuming


def test_connection_cut_resumes_from_the_part_file(hub: FakeHub, models: Path) -> None:
    hub.faults.cut_after_bytes = 1_200_000
    [f] = pull(f"hf:{TINY}", models)
    assert_pulled(hub, f, TINY, Q4)
    got = ranges(hub, TINY, Q4)
    assert got[0] is None and len(got) == 2
    assert got[1] is not None and got[1].startswith("bytes=") and got[1] != "bytes=0-"
    assert int(got[1].removeprefix("bytes=").rstrip("-")) >= 1_000_000
    assert hub.bytes_served(TINY, Q4) < 2 * 3 * MB
    assert hub.bytes_served(TINY, Q4) == 3 * MB  # not one byte sent twice


def test_a_connection_cut_every_time_still_gets_there(hub: FakeHub, models: Path) -> None:
    hub.faults.cut_after_bytes, hub.faults.cut_times = 700_000, -1
    [f] = pull(f"hf:{TINY}:Q8_0", models)
    assert_pulled(hub, f, TINY, Q8)
    assert len(ranges(hub, TINY, Q8)) == 3  # 700k + 700k + 600k; progress resets the count


def test_stall_is_detected_and_retried(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "STALL_TIMEOUT_S", 0.3)
    hub.faults.stall_after_bytes, hub.faults.stall_s = 1 * MB, 3.0
    started = time.monotonic()
    [f] = pull(f"hf:{TINY}:Q8_0", models)
    assert time.monotonic() - started < 2.5  # did not wait for the server to wake up
    assert_pulled(hub, f, TINY, Q8)
    got = ranges(hub, TINY, Q8)
    assert len(got) == 2 and got[1] is not None and got[1] != "bytes=0-"


def test_server_ignoring_range_restarts_cleanly(hub: FakeHub, models: Path) -> None:
    hub.faults.cut_after_bytes, hub.faults.ignore_range = 1 * MB, True
    [f] = pull(f"hf:{TINY}:Q8_0", models)
    assert_pulled(hub, f, TINY, Q8)
    assert hub.bytes_served(TINY, Q8) == 1 * MB + 2 * MB


def test_a_range_answer_from_the_wrong_offset_starts_over(hub: FakeHub, models: Path) -> None:
    hub.faults.cut_after_bytes, hub.faults.wrong_range_times = 1 * MB, 1
    [f] = pull(f"hf:{TINY}:Q8_0", models)
    assert_pulled(hub, f, TINY, Q8)
    assert ranges(hub, TINY, Q8) == [None, f"bytes={MB}-", None]


def test_a_transfer_waits_for_another_holding_the_part(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process downloading the same file holds the part's lock: wait, then resume."""
    monkeypatch.setattr(transfer, "LOCK_POLL_S", 0.01)
    remote = client.HubClient().snapshot(TINY).file(Q8)
    dest = layout.local_path(models, remote)
    dest.parent.mkdir(parents=True)
    layout.write_sidecar(dest, remote)
    with part_path(dest).open("ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        other.write(FILES[TINY][Q8][:MB])
        other.flush()
        monkeypatch.setattr(transfer, "LOCK_TIMEOUT_S", 0.1)
        with DownloadManager(models) as manager, pytest.raises(DownloadFailed, match="still"):
            manager.fetch(remote)
        monkeypatch.setattr(transfer, "LOCK_TIMEOUT_S", 5.0)
        threading.Timer(0.2, other.close).start()
        with DownloadManager(models) as manager:
            assert manager.fetch(remote) == dest
    assert dest.read_bytes() == FILES[TINY][Q8]
    assert ranges(hub, TINY, Q8) == [f"bytes={MB}-"]


def test_resume_after_a_failed_pull_in_a_new_manager(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "MAX_FAILED_ATTEMPTS", 1)
    hub.faults.cut_after_bytes = 1 * MB
    with DownloadManager(models) as first, pytest.raises(DownloadFailed):
        first.pull(f"hf:{TINY}")
    dest = models.resolve() / "hf" / "acme--tiny-GGUF" / hub.repos[TINY].commit / Q4
    assert part_path(dest).stat().st_size == 1 * MB and sidecar_path(dest).is_file()
    with DownloadManager(models) as second:
        [f] = second.pull(f"hf:{TINY}")
    assert_pulled(hub, f, TINY, Q4)
    assert ranges(hub, TINY, Q4) == [None, f"bytes={MB}-"]
    assert hub.bytes_served(TINY, Q4) == 3 * MB


def test_resume_after_a_canceled_pull_in_a_new_manager(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "PROGRESS_INTERVAL_S", 0.0)  # a report for every chunk
    hub.faults.stall_after_bytes, hub.faults.stall_s = 1 * MB, 10.0
    cancel = threading.Event()

    def on_progress(done: int, total: int, rate: float, eta: float | None) -> None:
        if done >= 1 * MB:
            cancel.set()

    with DownloadManager(models) as first, pytest.raises(Canceled):
        first.pull(f"hf:{TINY}", on_progress, cancel)
    parts = list(models.rglob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size >= 1 * MB
    with DownloadManager(models) as second:
        [f] = second.pull(f"hf:{TINY}")
    assert_pulled(hub, f, TINY, Q4)
    got = ranges(hub, TINY, Q4)
    assert len(got) == 2 and got[1] is not None and got[1] != "bytes=0-"
    assert hub.bytes_served(TINY, Q4) < 2 * 3 * MB


def test_a_part_of_other_bytes_is_not_resumed(hub: FakeHub, models: Path) -> None:
    dest = models.resolve() / "hf" / "acme--tiny-GGUF" / hub.repos[TINY].commit / Q4
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(b"junk" * 1000)
    sidecar_path(dest).write_text('{"version": 1, "sha256": "other"}')
    [f] = pull(f"hf:{TINY}", models)
    assert_pulled(hub, f, TINY, Q4)
    assert ranges(hub, TINY, Q4) == [None]


def test_manager_close_stops_a_transfer_and_keeps_its_part(hub: FakeHub, models: Path) -> None:
    hub.faults.stall_after_bytes, hub.faults.stall_s = 1 * MB, 10.0
    errors: list[BaseException] = []
    with DownloadManager(models) as manager:

        def run() -> None:
            try:
                manager.pull(f"hf:{TINY}")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: sum(p.stat().st_size for p in models.rglob("*.part")) >= MB, "1 MB")
        started = time.monotonic()
        manager.close()  # while the server stalls for 10 s
        thread.join(5)
        assert not thread.is_alive()
        assert time.monotonic() - started < 2.0
    assert len(errors) == 1 and isinstance(errors[0], Canceled)
    assert len(list(models.rglob("*.part"))) == 1
    with pytest.raises(Canceled, match="closed"):
        manager.pull(f"hf:{TINY}")


# --------------------------------------------------------------------------- sharing


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def callers(manager: DownloadManager) -> int:
    return sum(a.callers for a in manager.active())


def test_two_simultaneous_pulls_share_one_transfer(hub: FakeHub, models: Path) -> None:
    hub.faults.stall_after_bytes, hub.faults.stall_s = 1 * MB, 10.0  # until both have joined
    progress: dict[str, list[int]] = {"a": [], "b": []}
    results: dict[str, list[PulledFile]] = {}

    with DownloadManager(models) as manager:

        def run(name: str) -> None:
            results[name] = manager.pull(f"hf:{TINY}", lambda done, *_: progress[name].append(done))

        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        wait_for(lambda: callers(manager) == 2, "both pulls to wait on one transfer")
        [active] = manager.active()
        assert (active.filename, active.total_bytes) == (Q4, 3 * MB)
        hub.unstall.set()
        for t in threads:
            t.join(10)
    assert results["a"] == results["b"]
    assert_pulled(hub, results["a"][0], TINY, Q4)
    assert len(hub.file_gets(TINY, Q4)) == 1
    assert progress["a"][-1] == progress["b"][-1] == 3 * MB
    assert manager.active() == []


def test_one_caller_canceling_does_not_stop_the_other(hub: FakeHub, models: Path) -> None:
    hub.faults.stall_after_bytes, hub.faults.stall_s = 1 * MB, 10.0
    cancel_a = threading.Event()
    outcome: dict[str, object] = {}

    with DownloadManager(models) as manager:
        remote = client.HubClient().snapshot(TINY).file(Q4)

        def run(name: str, cancel: threading.Event | None) -> None:
            try:
                outcome[name] = manager.fetch(remote, cancel=cancel)
            except Canceled as exc:
                outcome[name] = exc

        a = threading.Thread(target=run, args=("a", cancel_a))
        b = threading.Thread(target=run, args=("b", None))
        a.start()
        b.start()
        wait_for(lambda: callers(manager) == 2, "both callers to join")
        cancel_a.set()
        a.join(5)
        assert isinstance(outcome["a"], Canceled)
        assert callers(manager) == 1
        hub.unstall.set()
        b.join(10)
    assert isinstance(outcome["b"], Path) and outcome["b"].read_bytes() == FILES[TINY][Q4]
    assert len(hub.file_gets(TINY, Q4)) == 1


def test_the_last_caller_canceling_stops_the_transfer(hub: FakeHub, models: Path) -> None:
    hub.faults.stall_after_bytes, hub.faults.stall_s = 1 * MB, 10.0
    cancel = threading.Event()
    with DownloadManager(models) as manager:
        remote = client.HubClient().snapshot(TINY).file(Q4)
        threading.Timer(0.2, cancel.set).start()
        with pytest.raises(Canceled):
            manager.fetch(remote, cancel=cancel)
        assert manager.active() == []  # forgotten at once: a new request starts afresh
    assert part_path(layout.local_path(models, remote)).stat().st_size >= 1 * MB
