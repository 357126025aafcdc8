"""The OpenAI gateway against a real `rbee hive` running the real model, driven by the official
``openai`` client and, for the exact bytes and headers, by httpx."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zmq

from rbee.catalog import DEFAULT_MODEL
from rbee.gateway.jobs import Job
from rbee.gateway.main import Server, prepare
from rbee.hive import probe
from rbee.keeper.job import JobEvent, Waiting
from rbee.keeper.link import hello
from rbee.protocol.messages import (
    Frame,
    GenerateParams,
    HiveStatus,
    ListWorkers,
    Status,
    WorkerInfo,
    WorkerList,
)
from rbee.transport.sockets import DealerClient, tcp_endpoint
from rbee.worker.engine import in_process
from tests.conftest import free_port
from tests.helpers import rbee_cmd, run_rbee
from tests.hub_server import FakeHub, FakeRepo

KEY = "test-key-0123456789abcdef"
HUB_REPO = "rbee-test/SmolLM2-135M-Instruct-GGUF"
HUB_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORY = "Once upon a time"
COLORS = "Name three colors."

HiveFactory = Callable[..., int]


@pytest.fixture
def start_hive(rbee_env: dict[str, str], tmp_path: Path) -> Iterator[HiveFactory]:
    """Start this test's `rbee hive ARGS` on its isolated port; it is stopped (SIGTERM) after."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> int:
        log = (tmp_path / f"hive{len(procs)}.log").open("wb")
        procs.append(subprocess.Popen(rbee_cmd("hive", *args), env=rbee_env, stderr=log))
        log.close()
        port = int(rbee_env["RBEE_HIVE_PORT"])
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        client, _ = hello(ctx, "127.0.0.1", port, (2.0, 2.0, 4.0, 8.0))
        client.close()
        ctx.term()
        return port

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@contextmanager
def serving(listen: str = "127.0.0.1:0", **options: Any) -> Iterator[Server]:
    """A gateway serving from a thread of this test until the block ends."""
    server = prepare(listen, **options)
    thread = threading.Thread(target=server.serve, name="gateway", daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.port}/health"
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        server.request_stop()
        thread.join(20)
        assert not thread.is_alive(), "the gateway did not stop"


@pytest.fixture
def gateway(start_hive: HiveFactory) -> Iterator[Server]:
    """A hive on this machine's port, found the way `rbee infer` finds it, and a gateway."""
    start_hive()
    with serving() as server:
        yield server


@pytest.fixture
def hub(model_path: Path, rbee_env: dict[str, str]) -> Iterator[FakeHub]:
    """A local Hugging Face Hub serving the default model's bytes; hives started after it
    download from it."""
    repos = {HUB_REPO: FakeRepo(files={HUB_FILE: model_path.read_bytes()})}
    with FakeHub(repos) as server:
        rbee_env["HF_ENDPOINT"] = server.endpoint
        rbee_env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        rbee_env.pop("HF_TOKEN", None)
        yield server


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(port: int, frame: Frame, timeout_s: float = 2.0) -> Frame:
    """One request to the loopback hive on ``port``, on a connection of its own."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = DealerClient(ctx, tcp_endpoint("127.0.0.1", port))
    try:
        return client.request(frame, timeout_s)
    finally:
        client.close()
        ctx.term()


def workers(port: int) -> list[WorkerInfo]:
    reply = ask(port, ListWorkers())
    assert isinstance(reply, WorkerList)
    return reply.workers


def queue_length(port: int) -> int:
    status = ask(port, Status(), 5.0)
    assert isinstance(status, HiveStatus)
    return status.queue_length


def sse_events(raw: bytes, comments: bool = False) -> list[bytes]:
    """The events of an SSE body, checking the framing on the way; keep-alive comments (sent
    while a slow machine loads the model) are dropped unless ``comments``."""
    assert raw.endswith(b"\n\n") and b"\r" not in raw
    events = raw.split(b"\n\n")[:-1]
    assert all(e == b": keep-alive" for e in events if e.startswith(b":"))
    return events if comments else [e for e in events if not e.startswith(b":")]


# ------------------------------------------------------------------ the official client


def places(client: openai.OpenAI) -> list[dict[str, Any]]:
    """Where the default model lives, as GET /v1/models says."""
    models = client.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL]
    nodes: list[dict[str, Any]] = (models[0].model_extra or {})["rbee"]["nodes"]
    return nodes


def test_openai_client_chat_completion_and_models(
    gateway: Server, rbee_env: dict[str, str]
) -> None:
    client = client_for(gateway)
    (place,) = places(client)
    assert place["address"] == f"127.0.0.1:{rbee_env['RBEE_HIVE_PORT']}"
    assert place["quantization"] == "Q4_1" and place["loaded"] is False

    messages: Any = [{"role": "user", "content": COLORS}]
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=24, temperature=0
    )
    text = whole.choices[0].message.content or ""
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert text.strip() and whole.choices[0].finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text, "greedy: the stream says what the whole answer said"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert places(client)[0]["loaded"] is True

    short = client.completions.create(
        model=DEFAULT_MODEL, prompt=STORY, max_tokens=6, temperature=0
    )
    assert short.choices[0].finish_reason == "length" and short.usage is not None
    assert short.usage.completion_tokens == 6 and short.object == "text_completion"
    pieces = client.completions.create(
        model=DEFAULT_MODEL, prompt=STORY, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == short.choices[0].text

    system: Any = [{"role": "system", "content": "Answer in one word."}, *messages]
    answered = client.chat.completions.create(model=DEFAULT_MODEL, messages=system, max_tokens=8)
    assert answered.choices[0].message.content is not None


def test_openai_client_errors(gateway: Server) -> None:
    client = client_for(gateway)
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=messages)
    assert missing.value.code == "MODEL_NOT_FOUND" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", stream=True)
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, n=2)
    assert several.value.param == "n" and several.value.code == "INVALID_REQUEST"
    with pytest.raises(openai.BadRequestError) as hot:
        client.completions.create(model=DEFAULT_MODEL, prompt="hi", temperature=2.5)
    assert hot.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, top_logprobs=2, stream=True
        )  # top_logprobs needs logprobs: true
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=f"file:/{DEFAULT_MODEL}.gguf", messages=messages)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    deep = b"[" * 100_000 + b"]" * 100_000  # Python's JSON parser recurses per level
    nested = httpx.post(gateway.url + "/v1/chat/completions", content=deep, timeout=30)
    assert nested.status_code == 400, nested.text
    assert "nests JSON too deeply" in nested.json()["error"]["message"]
    lone = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    surrogate = httpx.post(
        gateway.url + "/v1/chat/completions", content=lone % DEFAULT_MODEL.encode(), timeout=30
    )
    assert surrogate.status_code == 400, surrogate.text
    assert "lone surrogate U+D800" in surrogate.json()["error"]["message"]


# ------------------------------------------------------------------ the bytes on the wire


def test_sse_bytes_are_openai_framing(gateway: Server) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": COLORS}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        raw = r.read()
    events = sse_events(raw)
    assert all(e.startswith(b"data: {") for e in events[:-1]) and events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks[1:-2] if c["choices"][0]["delta"]]
    assert 1 <= len(content) <= 5  # tokens within the hive's stream interval share a chunk
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5

    plain = {"model": DEFAULT_MODEL, "prompt": STORY, "max_tokens": 3, "stream": True}
    raw = httpx.post(gateway.url + "/v1/completions", json=plain, timeout=60).content
    events = sse_events(raw)
    assert events[-1] == b"data: [DONE]" and 3 <= len(events) <= 5  # 1-3 of text, finish, [DONE]
    assert b'"usage"' not in raw

    missing = httpx.post(gateway.url + "/v1/completions", json={**plain, "model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_greedy_output_equals_rbee_infer(gateway: Server, rbee_env: dict[str, str]) -> None:
    client = client_for(gateway)
    infer = run_rbee("infer", "--raw", "-t", "0", "-n", "32", STORY, env=rbee_env)
    assert infer.returncode == 0, infer.stderr
    raw = (
        client.completions.create(model=DEFAULT_MODEL, prompt=STORY, max_tokens=32, temperature=0)
        .choices[0]
        .text
    )
    assert infer.stdout == raw + ("" if raw.endswith("\n") else "\n")

    infer = run_rbee("infer", "-t", "0", "-n", "32", COLORS, env=rbee_env)
    assert infer.returncode == 0, infer.stderr
    messages: Any = [{"role": "user", "content": COLORS}]
    chat = (
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=32, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert chat and infer.stdout == chat + ("" if chat.endswith("\n") else "\n")


@pytest.mark.skipif(
    "messages" not in GenerateParams.__dataclass_fields__,
    reason="GenerateParams carries no messages yet: chats are flattened to one user prompt",
)
def test_a_conversation_equals_llama_cpp_chat(gateway: Server, model_path: Path) -> None:
    messages: Any = [
        {"role": "system", "content": "You are a pirate. Answer briefly."},
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "Captain Byte, arr!"},
        {"role": "user", "content": COLORS},
    ]
    got = client_for(gateway).chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=40, temperature=0
    )
    llm = in_process(str(model_path), probe.for_model(str(model_path)))
    want: Any = llm.create_chat_completion(
        messages=messages, max_tokens=40, temperature=0, repeat_penalty=1.0
    )
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.usage is not None and got.usage.prompt_tokens == want["usage"]["prompt_tokens"]


# ------------------------------------------------------------------ lifecycle


def test_a_client_that_disconnects_frees_the_worker(
    gateway: Server, rbee_env: dict[str, str]
) -> None:
    port = int(rbee_env["RBEE_HIVE_PORT"])
    body = {
        "model": DEFAULT_MODEL,
        "prompt": STORY,
        "max_tokens": 4000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen == 10:
                break
        (busy,) = workers(port)
        assert busy.state == "busy"
    hung_up = time.monotonic()  # leaving the block closed the connection
    while (w := workers(port)[0]).state != "idle":
        assert time.monotonic() - hung_up < 1.0, f"the worker is still {w.state}"
        time.sleep(0.02)
    assert w.jobs_served == 1

    with pytest.raises(httpx.ReadTimeout):  # a whole (non-streamed) answer, given up on
        httpx.post(gateway.url + "/v1/completions", json={**body, "stream": False}, timeout=1.5)
    hung_up = time.monotonic()
    while (w := workers(port)[0]).state != "idle":
        assert time.monotonic() - hung_up < 1.0, f"the worker is still {w.state}"
        time.sleep(0.02)
    assert w.jobs_served == 2
    again = client_for(gateway).completions.create(model=DEFAULT_MODEL, prompt=STORY, max_tokens=2)
    assert again.model_extra and again.model_extra["rbee"]["worker_id"] == w.worker_id
    assert again.usage is not None and again.usage.completion_tokens == 2


def test_a_client_gone_during_the_download_frees_its_job(
    start_hive: HiveFactory, hub: FakeHub, rbee_env: dict[str, str]
) -> None:
    """The download goes on for `rbee models pull`, waiting for the same model; the gateway's
    job for a client that hung up ends at once instead of when the download does."""
    size = len(hub.repos[HUB_REPO].files[HUB_FILE])
    hub.faults.stall_after_bytes, hub.faults.stall_s = size // 2, 60.0  # until unstall is set
    start_hive()
    puller = subprocess.Popen(
        rbee_cmd("models", "pull", f"hf:{HUB_REPO}"),
        env=rbee_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while hub.bytes_served(HUB_REPO, HUB_FILE) < size // 2:
            assert time.monotonic() < deadline, "the download never reached its stall"
            time.sleep(0.05)
        body = {"model": f"hf:{HUB_REPO}", "prompt": STORY, "max_tokens": 3, "stream": True}
        with serving(keepalive_s=0.2) as server:
            url = server.url + "/v1/completions"
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                assert r.status_code == 200
                assert next(r.iter_lines()) == ": keep-alive", "the job waits for the download"
                (job,) = server.gateway.jobs.running
                assert job.alive
            hung_up = time.monotonic()  # leaving the block closed the connection
            while job.alive:
                assert time.monotonic() - hung_up < 2.0, "the job still waits for the download"
                time.sleep(0.02)
        assert puller.poll() is None, "the download goes on for the pull"
        hub.unstall.set()
        _, err = puller.communicate(timeout=60)
    finally:
        hub.unstall.set()
        if puller.poll() is None:
            puller.kill()
            puller.wait()
    assert puller.returncode == 0 and f"downloaded hf:{HUB_REPO}" in err, err
    assert len(hub.file_gets(HUB_REPO, HUB_FILE)) == 1, "one download, continued for the pull"


def test_stopping_the_gateway_ends_streams_and_frees_workers(start_hive: HiveFactory) -> None:
    port = start_hive()
    body = {
        "model": DEFAULT_MODEL,
        "prompt": STORY,
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        serving() as server,
        httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        stopping = time.monotonic()
        server.request_stop()
        last = [line for line in lines if line][-1]
    assert time.monotonic() - stopping < 3, "answers in flight end at once"
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "HIVE_DRAINING"
    while (w := workers(port)[0]).state != "idle":
        assert time.monotonic() - stopping < 3, f"the worker is still {w.state}"
        time.sleep(0.02)


def test_keep_alive_comments_while_the_model_loads(start_hive: HiveFactory) -> None:
    start_hive()
    body = {"model": DEFAULT_MODEL, "prompt": STORY, "max_tokens": 3, "stream": True}
    with serving(keepalive_s=0.05) as server:  # a cold hive: spawn and load take ~1 s
        raw = httpx.post(server.url + "/v1/completions", json=body, timeout=60).content
    events = sse_events(raw, comments=True)
    assert events[0] == b": keep-alive", "the wait is filled before any data"
    data = [e for e in events if e.startswith(b"data: ")]
    assert 3 <= len(data) <= 5 and data[-1] == b"data: [DONE]"  # 1-3 chunks of text, 1 of the end


def test_the_wait_for_a_worker_has_a_deadline(start_hive: HiveFactory) -> None:
    start_hive()
    body = {"model": DEFAULT_MODEL, "prompt": STORY, "max_tokens": 3}
    with serving(ready_timeout_s=0.05) as server:
        started = time.monotonic()
        late = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "TIMEOUT"
        assert time.monotonic() - started < 6
        with httpx.stream(
            "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            raw = r.read()
        assert r.status_code == 504 and b"TIMEOUT" in raw


def test_a_gateway_pinned_to_a_gpu_never_runs_on_the_cpu(start_hive: HiveFactory) -> None:
    """`rbee serve --backend cuda` on a hive without a usable GPU: every request is refused with
    BACKEND_UNAVAILABLE naming what exists, none runs on the CPU."""
    port = start_hive()
    body = {"model": DEFAULT_MODEL, "prompt": STORY, "max_tokens": 3}
    with serving(backend="cuda") as server:
        refused = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert refused.status_code >= 400
    error = refused.json()["error"]
    assert error["code"] == "BACKEND_UNAVAILABLE" and "cpu" in error["message"].lower()
    assert workers(port) == []


def test_busy_hive_is_429_with_retry_after(start_hive: HiveFactory) -> None:
    """One worker with one slot runs a long job and the queue's one place is taken: the next
    request is 429."""
    port = start_hive("--max-queue", "1", "--max-workers", "1", "--parallel", "1")
    body = {"model": DEFAULT_MODEL, "prompt": STORY, "max_tokens": 3}
    long = {**body, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with serving() as server:
        url = server.url + "/v1/completions"
        with httpx.stream("POST", url, json=long, timeout=60) as running:
            lines = running.iter_lines()
            while not next(lines).startswith("data: {"):
                pass  # its first token: the worker is busy with it
            with httpx.stream("POST", url, json=long, timeout=60):
                deadline = time.monotonic() + 10
                while queue_length(port) < 1:
                    assert time.monotonic() < deadline, "the second job never queued"
                    time.sleep(0.05)
                busy = httpx.post(url, json=body, timeout=60)
    assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["code"] == "ALL_SLOTS_BUSY"


def test_a_busy_hive_is_retried_like_the_cli(
    start_hive: HiveFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ALL_SLOTS_BUSY is retried with backoff (the keeper's job loop does it for both): slots
    that free up meanwhile serve the request."""
    port = start_hive("--max-queue", "1", "--max-workers", "1", "--parallel", "1")
    events: list[JobEvent] = []
    forward = Job._forward

    def recorded(job: Job, event: JobEvent) -> None:
        events.append(event)
        forward(job, event)

    monkeypatch.setattr(Job, "_forward", recorded)
    body = {"model": DEFAULT_MODEL, "prompt": STORY, "max_tokens": 3}
    long = {**body, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    answers: list[httpx.Response] = []
    with serving() as server:
        url = server.url + "/v1/completions"
        late = threading.Thread(
            target=lambda: answers.append(httpx.post(url, json=body, timeout=60))
        )
        with httpx.stream("POST", url, json=long, timeout=60) as running:
            lines = running.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            with httpx.stream("POST", url, json=long, timeout=60):
                deadline = time.monotonic() + 10
                while queue_length(port) < 1:
                    assert time.monotonic() < deadline, "the second job never queued"
                    time.sleep(0.05)
                late.start()
                while not any(isinstance(e, Waiting) and e.phase == "busy" for e in events):
                    assert time.monotonic() < deadline + 10, "the third request was not refused"
                    time.sleep(0.05)
        late.join(60)  # the two long answers were given up on: their jobs end, the slot frees
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3


def test_no_hive_reachable_is_503(rbee_env: dict[str, str]) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": STORY, "max_tokens": 3}
    with serving(node=f"127.0.0.1:{free_port()}") as server:
        gone = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert gone.status_code == 503 and gone.headers["retry-after"] == "1"
    assert gone.json()["error"]["code"] == "HIVE_UNREACHABLE"


# ------------------------------------------------------------------ keys


def test_keys_on_a_network_bind(rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_API_KEYS", KEY)
    with serving("0.0.0.0:0") as server:  # clients below connect over loopback only
        url = f"http://127.0.0.1:{server.port}"
        assert not server.config.allow_local_models
        no_key = httpx.get(url + "/v1/models")
        wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer " + KEY[:-1] + "x"})
        for refused in (no_key, wrong):
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "ACCESS_DENIED"
        assert httpx.get(url + "/health").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError):  # past the key check; file: is refused here
            client.completions.create(model="file:/etc/passwd", prompt="hi")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="x" * 20, max_retries=0).models.list()


def test_with_no_hive_running_an_ephemeral_one_serves(rbee_env: dict[str, str]) -> None:
    with serving() as server:
        client = client_for(server)
        assert places(client)[0]["node"] == "ephemeral"
        done = client.completions.create(model=DEFAULT_MODEL, prompt=STORY, max_tokens=4)
        assert done.usage is not None and done.usage.completion_tokens == 4
        # the ephemeral hive and its worker stop after the request; the leak check confirms


def test_serve_runs_until_sigterm_and_exits_zero(rbee_env: dict[str, str]) -> None:
    script = (
        "from rbee import log; log.configure('gateway', json=True); "
        "from rbee.gateway.main import prepare, run; raise SystemExit(run(prepare('127.0.0.1:0')))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=rbee_env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        line = json.loads(proc.stderr.readline())
        assert line["event"] == "gateway listening" and line["auth"] == "none (loopback only)"
        assert httpx.get(line["url"] + "/health", timeout=5).json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    assert proc.returncode == 0, rest
    assert "gateway stopped" in rest
