"""Ollama's /api/pull and /api/delete on `rbee serve`, driven by the official `ollama` client:
a real hive downloads from the local fake Hub (tests/hub_server.py) through rbee's verified
download, and the gateway reports it as Ollama does."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import pytest

from rbee.catalog import listed_entries
from rbee.paths import catalog_path
from rbee.protocol.messages import DEFAULT_MODEL
from tests.hub_server import FakeHub
from tests.integration.test_gateway import (
    HUB_FILE,
    HUB_REPO,
    KEY,
    HiveFactory,
    Server,
    gateway,
    hub,
    serving,
    start_hive,
)

__all__ = ["gateway", "hub", "start_hive"]  # the fixtures, shared with the OpenAI tests

PULLED = Path(HUB_FILE).stem.lower()  # the catalog name the hive gives the download
STALL_S = 1.0  # the fake Hub pauses mid-file, so the hive reports a point on the way


def client_for(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def names(client: ollama.Client) -> list[str]:
    return [m.model or "" for m in client.list().models]


def test_pull_with_progress_then_list_and_delete(
    start_hive: HiveFactory, hub: FakeHub, rbee_env: dict[str, str]
) -> None:
    size = len(hub.repos[HUB_REPO].files[HUB_FILE])
    # Progress is measured as bytes arrive, and loopback is fast: cut the file half-way, so the
    # resumed transfer reports its offset at once, then stall each response a little after its
    # start, so the hive tells that offset while nothing moves.
    hub.faults.cut_after_bytes = size // 2
    hub.faults.stall_after_bytes, hub.faults.stall_s, hub.faults.stall_times = 1 << 20, STALL_S, 2
    start_hive()
    with serving() as server:
        client = client_for(server)
        parts = list(client.pull(f"hf.co/{HUB_REPO}:q4_1", stream=True))
        assert parts[0].status == "pulling manifest"
        progress = [p for p in parts if p.digest]
        done = [p.completed or 0 for p in progress]
        assert done == sorted(done) and done[-1] == size, done
        assert any(size // 2 <= d < size for d in done), done
        assert {p.total for p in progress} == {size}
        assert {p.digest for p in progress} == {progress[0].digest}  # one bar for the file
        assert progress[0].digest and progress[0].digest.startswith("sha256:")
        assert [p.status for p in parts[-3:]] == [
            "verifying sha256 digest",
            "writing manifest",
            "success",
        ]
        assert PULLED in names(client)

        # Already here: no second download; the answer names the model as /api/tags lists it.
        again = httpx.post(
            server.url + "/api/pull", json={"model": f"hf:{HUB_REPO}", "stream": False}, timeout=60
        )
        assert again.json() == {"status": "success", "model": PULLED}
        downloads = len(hub.file_gets(HUB_REPO, HUB_FILE))

        assert client.delete(PULLED).status == "success"
        assert PULLED not in names(client)
        assert not list((Path(rbee_env["RBEE_DATA_DIR"]) / "models").rglob(HUB_FILE))
        with pytest.raises(ollama.ResponseError) as gone:
            client.delete(PULLED)
        assert gone.value.status_code == 404 and gone.value.error == f"model '{PULLED}' not found"

        # Whole: one success once the download is verified, and the model is back.
        assert client.pull(f"hf:{HUB_REPO}/{HUB_FILE}", stream=False).status == "success"
        assert len(hub.file_gets(HUB_REPO, HUB_FILE)) == downloads + 1
        assert PULLED in names(client)

        # A repo the Hub lacks: the stream has begun, so the error is its last line.
        with pytest.raises(ollama.ResponseError) as streamed:
            list(client.pull("hf:rbee-test/missing-GGUF", stream=True))
        assert "missing-GGUF" in streamed.value.error
        with pytest.raises(ollama.ResponseError) as whole:
            client.pull("hf:rbee-test/missing-GGUF", stream=False)
        assert whole.value.status_code == 404 and "missing-GGUF" in whole.value.error


def pull_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pull hf:")]


def gone_soon(what: Callable[[], list[threading.Thread]], within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_client_gone_mid_pull_frees_its_thread(start_hive: HiveFactory, hub: FakeHub) -> None:
    """The gateway's thread for the pull ends at once; the download goes on on the hive, so
    the next pull gets the model without downloading it again."""
    size = len(hub.repos[HUB_REPO].files[HUB_FILE])
    hub.faults.stall_after_bytes, hub.faults.stall_s = size // 2, 60.0  # until unstall is set
    start_hive()
    try:
        with serving() as server:
            body = {"model": f"hf:{HUB_REPO}"}
            with httpx.stream("POST", server.url + "/api/pull", json=body, timeout=60) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # kept: a dropped iterator closes the response
                assert json.loads(next(lines)) == {"status": "pulling manifest"}
                deadline = time.monotonic() + 60
                while hub.bytes_served(HUB_REPO, HUB_FILE) < size // 2:
                    assert time.monotonic() < deadline, "the download never reached its stall"
                    time.sleep(0.05)
                assert len(pull_threads()) == 1
            assert gone_soon(pull_threads), "the pull's thread still waits for the download"
            with pytest.raises(httpx.ReadTimeout):  # whole: the client gives up waiting
                httpx.post(server.url + "/api/pull", json={**body, "stream": False}, timeout=1)
            assert gone_soon(pull_threads), "the whole pull's thread still waits"
            hub.unstall.set()
            assert client_for(server).pull(f"hf:{HUB_REPO}", stream=False).status == "success"
    finally:
        hub.unstall.set()
    assert len(hub.file_gets(HUB_REPO, HUB_FILE)) == 1, "one download, continued on the hive"


def test_a_model_in_use_is_not_deleted(gateway: Server) -> None:
    client = client_for(gateway)
    client.generate(DEFAULT_MODEL, "Hi", options={"num_predict": 1})  # a worker now holds it
    with pytest.raises(ollama.ResponseError) as busy:
        client.delete(DEFAULT_MODEL)
    assert busy.value.status_code == 409 and "loaded by worker" in busy.value.error
    assert DEFAULT_MODEL in names(client)


def test_names_rbee_cannot_pull_and_where_delete_is_refused(
    rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving() as server:  # no hive: these are answered before one is looked for
        client = client_for(server)
        for name in ("llama3.2", "hf.co/acme/tiny-GGUF:not-a-quant", "hf:acme"):
            with pytest.raises(ollama.ResponseError) as bad:
                list(client.pull(name, stream=True))  # an HTTP status, not a stream
            with pytest.raises(ollama.ResponseError) as bad_whole:
                client.pull(name, stream=False)
            for error in (bad.value, bad_whole.value):
                assert error.status_code == 400, error.error
                assert "Hugging Face" in error.error and "hf:ORG/REPO" in error.error
        for body in ({"model": "hf:acme/tiny-GGUF", "stream": "yes"}, {"stream": False}):
            refused = httpx.post(server.url + "/api/pull", json=body, timeout=30)
            assert refused.status_code == 400 and "error" in refused.json()
        with pytest.raises(ollama.ResponseError) as unknown:
            client.delete("no-such-model")
        assert unknown.value.status_code == 404
    with serving(node="192.0.2.1:7830") as pinned:  # a hive elsewhere: not this catalog
        with pytest.raises(ollama.ResponseError) as elsewhere:
            client_for(pinned).delete(DEFAULT_MODEL)
        assert elsewhere.value.status_code == 400 and "192.0.2.1" in elsewhere.value.error
    monkeypatch.setenv("RBEE_API_KEYS", KEY)
    with serving("0.0.0.0:0") as server:  # reachable from the network; clients use loopback
        keyed = ollama.Client(
            host=f"http://127.0.0.1:{server.port}", headers={"Authorization": f"Bearer {KEY}"}
        )
        with pytest.raises(ollama.ResponseError) as forbidden:
            keyed.delete(DEFAULT_MODEL)
        assert forbidden.value.status_code == 403 and "rbee models rm" in forbidden.value.error
    assert DEFAULT_MODEL in [e.name for e in listed_entries(catalog_path())]
