"""A real hive with real llama.cpp workers, driven over real ZeroMQ sockets."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from rbee.errors import (
    InvalidModel,
    InvalidRequest,
    JobNotFound,
    ModelNotFound,
    ProtocolError,
    VersionMismatch,
    WorkerNotFound,
    WorkerStartFailed,
)
from rbee.hive import probe
from rbee.keeper.stream import JobStream
from rbee.protocol.codec import decode
from rbee.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Done,
    EnsureWorker,
    GenerateParams,
    Hello,
    HelloReply,
    HiveStatus,
    JobAccepted,
    ListWorkers,
    Progress,
    StartJob,
    Status,
    StopWorker,
    Token,
    WorkerAssigned,
    WorkerList,
)
from rbee.transport.sockets import DealerClient, StreamSubscriber
from rbee.worker.engine import in_process
from tests.helpers import hive_in_thread, keeper

LOAD_TIMEOUT_S = 60.0
PROMPT = "The three primary colors are"
MODEL = "smollm2-135m-instruct"


def ensure(client: DealerClient, model: str) -> tuple[WorkerAssigned, list[Progress]]:
    """EnsureWorker, collecting the progress frames before the final answer."""
    rid = client.send(EnsureWorker(model=model))
    progress: list[Progress] = []
    for frame in client.replies(rid, LOAD_TIMEOUT_S):
        if isinstance(frame, Progress):
            progress.append(frame)
        else:
            assert isinstance(frame, WorkerAssigned)
            return frame, progress
    raise AssertionError("unreachable")


def start(
    client: DealerClient, job_id: str, worker_id: str, params: GenerateParams, model: str = MODEL
) -> tuple[JobAccepted, list[Progress]]:
    """StartJob, collecting queue progress until the job is accepted by a worker."""
    rid = client.send(StartJob(job_id=job_id, model=model, worker_id=worker_id, params=params))
    queued: list[Progress] = []
    for frame in client.replies(rid, 10):
        if isinstance(frame, JobAccepted):
            return frame, queued
        assert isinstance(frame, Progress) and frame.phase == "queued", frame
        queued.append(frame)
    raise AssertionError("unreachable")


def run_job(
    client: DealerClient, sub: StreamSubscriber, worker_id: str, params: GenerateParams
) -> tuple[list[Token], Done, JobStream]:
    """Subscribe, start, and read the job's stream to its terminal frame."""
    job_id = f"j-{time.monotonic_ns()}"
    sub.subscribe(job_id)
    start(client, job_id, worker_id, params)
    stream = JobStream(client, sub, job_id)
    frames = list(stream)
    assert isinstance(frames[-1], Done), frames[-1]
    tokens = [f for f in frames[:-1] if isinstance(f, Token)]
    return tokens, frames[-1], stream


@pytest.fixture
def data_dir(tmp_path: Path, rbee_env: dict[str, str]) -> Path:
    return tmp_path / "data"


def test_hello_and_status(data_dir: Path) -> None:
    with hive_in_thread(data_dir) as hive, keeper(hive) as (client, _):
        hello = client.request(Hello(), 5)
        assert isinstance(hello, HelloReply)
        assert hello.protocol_version == PROTOCOL_VERSION and hello.status == "ok"
        status = client.request(Status(), 5)
        assert isinstance(status, HiveStatus)
        assert [m.name for m in status.models] == [MODEL]
        assert status.models[0].quantization == "Q4_1"
        assert status.ram_total_bytes > status.ram_free_bytes > 0
        assert status.disk_free_bytes > 0 and status.workers == []


def test_streams_what_llama_cpp_generates_in_process(data_dir: Path, model_path: Path) -> None:
    """Greedy output through hive and worker equals llama-cpp-python's own, raw and chat."""
    llama = in_process(str(model_path), probe.for_model(str(model_path)))
    want_raw = llama.create_completion(PROMPT, max_tokens=48, temperature=0.0)["choices"][0]
    want_chat = llama.create_chat_completion(
        [{"role": "user", "content": "Why is the sky blue?"}],
        max_tokens=48,
        temperature=0.0,
        repeat_penalty=1.0,
    )["choices"][0]["message"]["content"]
    del llama
    with hive_in_thread(data_dir) as hive, keeper(hive) as (client, sub):
        assigned, progress = ensure(client, MODEL)
        assert not assigned.reused
        phases = [p.phase for p in progress]
        assert phases[0] == "spawn" and "registered" in phases and "loading" in phases
        raw = GenerateParams(prompt=PROMPT, max_tokens=48, temperature=0.0, raw=True)
        tokens, done, _ = run_job(client, sub, assigned.worker_id, raw)
        assert "".join(t.text for t in tokens) + done.tail == want_raw["text"]
        assert [t.seq for t in tokens] == list(range(len(tokens))) and done.seq == len(tokens)
        assert done.tokens == sum(t.count for t in tokens) >= 20 and done.prompt_tokens > 0
        chat = GenerateParams(prompt="Why is the sky blue?", max_tokens=48, temperature=0.0)
        tokens, done, _ = run_job(client, sub, assigned.worker_id, chat)
        assert "".join(t.text for t in tokens) + done.tail == want_chat
        again, _ = ensure(client, MODEL)
        assert again.reused and again.worker_id == assigned.worker_id


def test_late_slow_subscriber_gets_every_token_once(data_dir: Path) -> None:
    """Subscribe after StartJob, read slower than the model writes with a receive queue of one
    frame: PUB/SUB drops, and the keeper still sees each sequence number exactly once."""
    with hive_in_thread(data_dir) as hive, keeper(hive, hwm=1) as (client, sub):
        assigned, _ = ensure(client, MODEL)
        params = GenerateParams(
            prompt=PROMPT, max_tokens=64, temperature=0.0, raw=True, ignore_eos=True
        )
        job_id = "j-late-slow"
        rid = client.send(
            StartJob(job_id=job_id, model=MODEL, worker_id=assigned.worker_id, params=params)
        )
        time.sleep(1.0)  # the hive must hold the job until the subscription arrives
        assert not client.sock.poll(0), "nothing may start before the keeper listens"
        sub.subscribe(job_id)
        accepted = next(client.replies(rid, 5))
        assert isinstance(accepted, JobAccepted) and accepted.worker_id == assigned.worker_id
        frames = []
        stream = JobStream(client, sub, job_id)
        for frame in stream:
            frames.append(frame)
            time.sleep(0.05)  # slower than the model produces
        done = frames[-1]
        assert isinstance(done, Done) and done.tokens == 64
        assert [f.seq for f in frames] == list(range(done.seq + 1))
        assert sum(f.count for f in frames[:-1]) == 64  # type: ignore[union-attr]


def test_dropped_frames_are_recovered(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full-speed synthetic stream into a reader that stalls: the hive's high-water mark
    drops frames (shrunk here, with small kernel buffers), and FetchFrames fills every gap. One
    frame per token (no stream interval), so that 20,000 tokens are 20,000 frames."""
    monkeypatch.setattr("rbee.hive.server.STREAM_HWM", 16)
    n = 20_000
    hive_ctx = hive_in_thread(data_dir, stream_interval_ms=0)
    with hive_ctx as hive, keeper(hive, hwm=16) as (client, sub):
        hive.xpub.setsockopt(zmq.SNDBUF, 4096)
        sub.sock.setsockopt(zmq.RCVBUF, 4096)
        assigned, _ = ensure(client, "synthetic:0")
        params = GenerateParams(prompt="x", max_tokens=n)
        sub.subscribe("j-drops")
        start(client, "j-drops", assigned.worker_id, params, model="synthetic:0")
        time.sleep(0.3)  # stall while the stream overflows
        stream = JobStream(client, sub, "j-drops")
        seen = [frame.seq for frame in stream]
        assert seen == list(range(n + 1))
        assert stream.fetched > 0, "expected PUB/SUB to drop frames under a stalled reader"


def test_errors_are_coded_replies(data_dir: Path, tmp_path: Path) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with hive_in_thread(data_dir) as hive, keeper(hive) as (client, _):
        with pytest.raises(ModelNotFound, match="nope"):
            ensure(client, "nope")
        with pytest.raises(InvalidModel, match="not a usable GGUF"):
            ensure(client, f"file:{not_gguf}")
        with pytest.raises(JobNotFound):
            client.request(Cancel(job_id="j-none"), 5)
        with pytest.raises(WorkerNotFound, match="w-none"):
            params = GenerateParams(prompt="hi")
            client.request(
                StartJob(job_id="j-1", model=MODEL, worker_id="w-none", params=params), 5
            )
        assert isinstance(client.request(Hello(), 5), HelloReply), "the hive must survive"


def test_malformed_frames_get_errors_and_never_kill_the_hive(data_dir: Path) -> None:
    with hive_in_thread(data_dir) as hive:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(hive.front_endpoint)
        bad = [
            b"\xc1not msgpack",
            msgpack.packb([1, 2, 3]),
            msgpack.packb({"v": 99, "t": "hello", "r": 1, "b": {}}),
            msgpack.packb({"v": PROTOCOL_VERSION, "t": "no_such_frame", "r": 1, "b": {}}),
            msgpack.packb({"v": PROTOCOL_VERSION, "t": "start_job", "r": 1, "b": {"job_id": 5}}),
        ]
        expected = [ProtocolError, ProtocolError, VersionMismatch, ProtocolError, InvalidRequest]
        for data, exc_type in zip(bad, expected, strict=True):
            sock.send(data)
            assert sock.poll(5000), "no error reply"
            frame = decode(sock.recv()).frame
            assert frame.TYPE == "error" and frame.code == exc_type.code  # type: ignore[attr-defined]
        sock.send_multipart([b"", b"two", b"extra parts"])
        sock.close(0)
        ctx.term()
        assert hive.front.dropped >= len(bad)
        with keeper(hive) as (client, _):
            assert isinstance(client.request(Hello(), 5), HelloReply)


def test_worker_that_dies_while_loading_is_reported(data_dir: Path) -> None:
    """Kill the worker right after it is spawned: WORKER_START_FAILED with its stderr tail."""
    with hive_in_thread(data_dir) as hive, keeper(hive) as (client, _):
        rid = client.send(EnsureWorker(model=MODEL))
        replies = client.replies(rid, LOAD_TIMEOUT_S)
        spawn = next(replies)
        assert isinstance(spawn, Progress) and spawn.phase == "spawn"
        pid = int(spawn.message.split("(pid ")[1].split(")")[0])
        psutil.Process(pid).send_signal(signal.SIGKILL)
        with pytest.raises(WorkerStartFailed, match="exited with code -9"):
            for _ in replies:
                pass
        listed = client.request(ListWorkers(), 5)
        assert isinstance(listed, WorkerList) and listed.workers == []


def test_cancel_stop_worker_and_vanished_keeper(data_dir: Path) -> None:
    with hive_in_thread(data_dir) as hive, keeper(hive) as (client, sub):
        assigned, _ = ensure(client, MODEL)
        long = GenerateParams(
            prompt=PROMPT, max_tokens=2000, temperature=0.0, raw=True, ignore_eos=True
        )
        sub.subscribe("j-cancel")
        start(client, "j-cancel", assigned.worker_id, long)
        frames, seen = [], 0
        for frame in JobStream(client, sub, "j-cancel"):
            frames.append(frame)
            seen += frame.count if isinstance(frame, Token) else 0
            if len(frames) == 5:
                at_cancel = seen
                assert isinstance(client.request(Cancel(job_id="j-cancel"), 5), Ack)
        done = frames[-1]
        assert isinstance(done, Done) and done.stop_reason == "canceled"
        # a token or two past the cancel, and those the worker held for the stream interval
        assert done.tokens <= at_cancel + 5, "the worker must stop within a token of the cancel"
        assert isinstance(client.request(Cancel(job_id="j-cancel"), 5), Ack), "cancel twice"

        # A keeper that vanishes (its SUB closes) gets its job canceled by the hive.
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        gone = StreamSubscriber(ctx, hive.stream_endpoint, 100)
        gone.subscribe("j-gone")
        start(client, "j-gone", assigned.worker_id, long)
        time.sleep(0.5)
        gone.close()
        ctx.term()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            workers = client.request(ListWorkers(), 5)
            assert isinstance(workers, WorkerList)
            if workers.workers[0].state == "idle":
                break
            time.sleep(0.1)
        assert workers.workers[0].state == "idle"
        assert hive.jobs["j-gone"].finished

        pid = workers.workers[0].pid
        assert isinstance(client.request(StopWorker(worker_id=assigned.worker_id), 5), Ack)
        psutil.Process(pid).wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            workers = client.request(ListWorkers(), 5)
            assert isinstance(workers, WorkerList)
            if not workers.workers:
                break
            time.sleep(0.1)
        assert workers.workers == []


def test_hive_stop_stops_its_workers(data_dir: Path) -> None:
    with hive_in_thread(data_dir) as hive, keeper(hive) as (client, _):
        assigned, _ = ensure(client, MODEL)
        pid = hive.workers[assigned.worker_id].pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_concurrent_requests_share_one_loading_worker(data_dir: Path) -> None:
    with hive_in_thread(data_dir) as hive:
        results: list[WorkerAssigned] = []

        def ask() -> None:
            with keeper(hive) as (client, _):
                results.append(ensure(client, MODEL)[0])

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(LOAD_TIMEOUT_S)
        assert len(results) == 3 and len({r.worker_id for r in results}) == 1
        assert len(hive.workers) == 1
