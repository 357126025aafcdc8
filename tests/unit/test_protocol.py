"""Unit tests for rbee.protocol: the schema (validation), the frame types and the codec."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import msgpack
import pytest

from rbee.errors import InvalidRequest, ProtocolError, RbeeError, VersionMismatch
from rbee.protocol import schema
from rbee.protocol.codec import MAX_FRAME_BYTES, Envelope, decode, decode_as, encode
from rbee.protocol.messages import (
    FRAME_TYPES,
    MAX_STOP_STRINGS,
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    CancelJob,
    ChunkData,
    Done,
    EnsureWorker,
    Error,
    Explain,
    Explanation,
    FetchFrames,
    FileHeld,
    FileQuery,
    Frame,
    FramesReply,
    GenerateParams,
    GetLogs,
    Heartbeat,
    Hello,
    HelloReply,
    HiveStatus,
    JobAccepted,
    LeasePing,
    LeaseState,
    ListWorkers,
    LogLines,
    Metrics,
    MetricsText,
    ModelInfo,
    ModelPulled,
    PairAccepted,
    PairConfirm,
    PairHello,
    PairHelloReply,
    PipeClose,
    PipeData,
    PipeOpen,
    PipeOpened,
    PlacementOption,
    Progress,
    PullModel,
    ReadChunk,
    RunJob,
    StartJob,
    Status,
    StopRequest,
    StopWorker,
    StreamError,
    Token,
    WorkerAssigned,
    WorkerFailed,
    WorkerInfo,
    WorkerList,
    WorkerLoading,
    WorkerReady,
)

# --------------------------------------------------------------------------- sample frames

PARAMS = GenerateParams(
    prompt="Why is the sky blue? ünïcode ✓",
    max_tokens=17,
    temperature=0.25,
    top_p=0.5,
    top_k=7,
    seed=1234,
    stop=["\n\n", "###"],
    raw=True,
    ignore_eos=True,
)
WORKER = WorkerInfo(
    worker_id="w-1234abcd",
    model="smollm2-135m-instruct",
    backend="cpu",
    device="cpu",
    pid=4242,
    state="busy",
    last_activity=1_700_000_000.5,
    job_id="job-1",
    rss_bytes=123_456_789,
    jobs_served=3,
    keep_alive_s=-1.0,
)
MODEL = ModelInfo(
    name="tiny",
    path="/models/tiny.gguf",
    size_bytes=98_362_432,
    architecture="llama",
    quantization="Q4_1",
    context_length=8192,
    parameter_count=134_515_008,
)


def _samples() -> list[Frame]:
    token = Token(job_id="job-1", seq=3, text="héllo", token_id=99, count=2)
    done = Done(
        job_id="job-1",
        seq=4,
        tokens=4,
        prompt_tokens=12,
        ttft_s=0.125,
        decode_s=1.5,
        stop_reason="stop",
        tail="…",
    )
    return [
        Hello(client="keeper"),
        HelloReply(
            node="box",
            rbee_version="0.1.0",
            protocol_version=PROTOCOL_VERSION,
            pid=10,
            stream_port=7831,
            status="draining",
        ),
        Status(),
        HiveStatus(
            node="box",
            rbee_version="0.1.0",
            protocol_version=PROTOCOL_VERSION,
            workers=[WORKER, dataclasses.replace(WORKER, worker_id="w-2", state="idle")],
            models=[MODEL],
            cpu_count=16,
            ram_total_bytes=2**37,
            ram_free_bytes=2**36,
            disk_free_bytes=2**40,
            queue_length=2,
            max_workers=4,
        ),
        EnsureWorker(model="file:/models/tiny.gguf", backend="cpu", n_ctx=2048),
        Progress(phase="loading", message="50%", done=0.5, total=1.0),
        WorkerAssigned(worker_id="w-1", model="tiny", reused=True, load_s=2.5, busy=True),
        StartJob(job_id="job-1", model="tiny", params=PARAMS, worker_id="w-1", keep_alive_s=60.0),
        JobAccepted(job_id="job-1", worker_id="w-1"),
        Cancel(job_id="job-1"),
        ListWorkers(),
        Explain(model="m", backend="cuda", device="0", n_ctx=2048),
        Explanation(
            node="n",
            model="m",
            chosen="cuda:0 31/31 (NVIDIA H200)",
            estimate="1,000 MiB",
            options=[PlacementOption(kind="gpu", label="cuda:0 31/31", fits=True, why="fits")],
        ),
        WorkerList(workers=[WORKER]),
        StopWorker(worker_id="w-1"),
        FetchFrames(job_id="job-1", from_seq=5),
        FramesReply(job_id="job-1", frames=[encode(token), encode(done)], finished=True),
        Ack(detail="stopped"),
        Error(
            code="ALL_SLOTS_BUSY",
            message="busy",
            suggestion="wait",
            retryable=True,
            retry_after_s=1.5,
        ),
        WorkerLoading(worker_id="w-1", fraction=0.75, message="tensors"),
        WorkerReady(worker_id="w-1", pid=77, n_ctx=4096, has_chat_template=True, load_s=0.3),
        WorkerFailed(worker_id="w-1", code="INVALID_MODEL", message="bad file"),
        Heartbeat(worker_id="w-1", job_id="job-1"),
        RunJob(job_id="job-1", params=PARAMS),
        CancelJob(job_id="job-1"),
        StopRequest(),
        token,
        done,
        StreamError(job_id="job-1", seq=2, code="WORKER_CRASHED", message="died"),
        PullModel(reference="hf:org/repo:Q4_K_M", hub=False, peers=True),
        FileQuery(repo="org/repo", commit="c" * 40, filename="x.gguf", sha256="ab" * 32),
        FileHeld(
            held=True,
            repo="org/repo",
            commit="c" * 40,
            filename="x.gguf",
            sha256="ab" * 32,
            size=5 << 20,
            chunk_bytes=4 << 20,
            hashes=b"h" * 64,
        ),
        ReadChunk(sha256="ab" * 32, index=1),
        ChunkData(sha256="ab" * 32, index=1, data=b"\x00" * 1024),
        GetLogs(after=3, worker_id="w-1", limit=10),
        LogLines(lines=['{"event": "hive ready"}'], last=4),
        Metrics(),
        MetricsText(text='# TYPE rbee_queue_depth gauge\nrbee_queue_depth{node="a"} 0.0\n'),
        ModelPulled(
            name="repo.q4_k_m",
            reference="hf:org/repo:Q4_K_M",
            path="/m/x.gguf",
            size_bytes=9,
            sha256="ab" * 32,
            downloaded=True,
        ),
        PairHello(msg=b"a" * 33),
        PairHelloReply(msg=b"b" * 33),
        PairConfirm(key="k" * 40, mac=b"m" * 32),
        PairAccepted(
            key="k" * 40,
            node_id="n" * 32,
            node="box",
            role="infer",
            router_port=7830,
            mac=b"m" * 32,
        ),
        PipeOpen(pipe_id="w-1-0.1", lease="w-1-0", model="big"),
        PipeOpened(pipe_id="w-1-0", free_bytes=1 << 30),
        PipeData(pipe_id="w-1-0", seq=7, data=b"\x00rpc"),
        PipeClose(pipe_id="w-1-0.1", reason="done", lease="w-1-0"),
        LeasePing(lease="w-1-0"),
        LeaseState(lease="w-1-0", cpu_s=12.5, running=True),
    ]


SAMPLES = _samples()


def test_samples_cover_every_frame_type() -> None:
    assert sorted(f.TYPE for f in SAMPLES) == sorted(FRAME_TYPES)
    for name, cls in FRAME_TYPES.items():
        assert name == cls.TYPE


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: f.TYPE)
def test_every_frame_type_round_trips(frame: Frame) -> None:
    data = encode(frame, rid=41)
    env = decode(data)
    assert isinstance(env, Envelope)
    assert env.rid == 41
    assert type(env.frame) is type(frame)
    assert env.frame == frame
    # a second round trip is byte-identical (the codec is deterministic)
    assert encode(env.frame, rid=41) == data


def test_nested_records_come_back_as_records() -> None:
    status = decode(encode(SAMPLES[3])).frame
    assert isinstance(status, HiveStatus)
    assert all(isinstance(w, WorkerInfo) for w in status.workers)
    assert status.workers[1].worker_id == "w-2"
    assert status.workers[1].state == "idle"
    assert isinstance(status.models[0], ModelInfo)
    assert status.models[0].context_length == 8192
    job = decode(encode(StartJob(job_id="j", model="m", params=PARAMS))).frame
    assert isinstance(job, StartJob)
    assert isinstance(job.params, GenerateParams)
    assert job.params.stop == ["\n\n", "###"]
    assert job.params.prompt == PARAMS.prompt


def test_frames_reply_carries_decodable_stream_frames() -> None:
    reply = decode(encode(next(s for s in SAMPLES if isinstance(s, FramesReply)))).frame
    assert isinstance(reply, FramesReply)
    inner = [decode(b).frame for b in reply.frames]
    assert [type(f) for f in inner] == [Token, Done]
    assert isinstance(inner[0], Token) and inner[0].text == "héllo"


def test_wire_shape() -> None:
    raw = msgpack.unpackb(encode(Cancel(job_id="abc"), rid=9), raw=False)
    assert raw == {"v": PROTOCOL_VERSION, "t": "cancel", "r": 9, "b": {"job_id": "abc"}}


def test_defaults_fill_in_missing_optional_fields() -> None:
    env = decode(
        _pack(
            {
                "v": PROTOCOL_VERSION,
                "t": "run_job",
                "b": {"job_id": "j", "params": {"prompt": "hi"}},
            }
        )
    )
    assert env.rid == 0
    assert isinstance(env.frame, RunJob)
    params = env.frame.params
    assert (params.max_tokens, params.temperature, params.top_p) == (256, 0.8, 0.95)
    assert (params.top_k, params.seed, params.stop, params.raw) == (40, -1, [], False)


# --------------------------------------------------------------------------- validation


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj)
    return data


def _frame_bytes(type_name: str, body: Any, **extra: Any) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "t": type_name, "r": 1, "b": body, **extra})


def test_every_bad_field_is_named_at_once() -> None:
    with pytest.raises(InvalidRequest) as exc:
        GenerateParams(prompt="x", max_tokens=0, temperature=9, top_p=3, stop=[1])  # type: ignore[list-item]
    msg = exc.value.message
    assert msg.startswith("invalid GenerateParams: ")
    for part in (
        "max_tokens must be ≥ 1",
        "temperature must be ≤ 5",
        "top_p must be ≤ 1",
        "stop[0] must be text",
    ):
        assert part in msg, msg
    assert msg.count(";") == 3  # exactly four problems
    assert "prompt" not in msg.removeprefix("invalid GenerateParams: ")
    assert exc.value.suggestion


def test_every_bad_field_is_named_at_once_on_decode() -> None:
    body = {"prompt": "x", "max_tokens": 0, "temperature": 9, "top_p": 3, "stop": [1]}
    with pytest.raises(InvalidRequest) as exc:
        decode(_frame_bytes("run_job", {"job_id": "j", "params": body}))
    msg = exc.value.message
    for field in ("max_tokens", "temperature", "top_p", "stop[0]"):
        assert f"params.{field} " in msg, msg
    assert msg.startswith("invalid RunJob: params is invalid")


def test_missing_required_fields_are_all_named() -> None:
    with pytest.raises(InvalidRequest) as exc:
        decode(_frame_bytes("token", {"token_id": 3}))
    msg = exc.value.message
    for field in ("job_id", "seq", "text"):
        assert f"{field} is required" in msg, msg
    assert "token_id" not in msg


def test_missing_and_invalid_fields_together() -> None:
    with pytest.raises(InvalidRequest) as exc:
        decode(_frame_bytes("done", {"job_id": "j", "seq": -1, "stop_reason": "tired"}))
    msg = exc.value.message
    assert "seq must be ≥ 0 (got -1)" in msg
    assert "stop_reason must be one of eos, length, stop, canceled (got 'tired')" in msg
    for field in ("tokens", "prompt_tokens", "ttft_s", "decode_s"):
        assert f"{field} is required" in msg


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "seed"])
def test_bool_is_rejected_for_int_fields(field: str) -> None:
    with pytest.raises(InvalidRequest, match=f"{field} must be an integer \\(got True\\)"):
        GenerateParams(prompt="x", **{field: True})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=f"params.{field} must be an integer"):
        decode(_frame_bytes("run_job", {"job_id": "j", "params": {"prompt": "x", field: True}}))


def test_bool_is_rejected_for_float_fields() -> None:
    with pytest.raises(InvalidRequest, match="temperature must be a number"):
        GenerateParams(prompt="x", temperature=False)


def test_float_is_rejected_for_int_fields() -> None:
    with pytest.raises(InvalidRequest, match=r"seq must be an integer \(got 1.5\)"):
        decode(_frame_bytes("token", {"job_id": "j", "seq": 1.5, "text": ""}))


def test_non_bool_is_rejected_for_bool_fields() -> None:
    with pytest.raises(InvalidRequest, match=r"raw must be true or false \(got 1\)"):
        GenerateParams(prompt="x", raw=1)  # type: ignore[arg-type]


def test_int_is_accepted_for_float_fields_on_decode() -> None:
    params = {"prompt": "x", "temperature": 1, "top_p": 0}
    frame = decode(_frame_bytes("run_job", {"job_id": "j", "params": params})).frame
    assert isinstance(frame, RunJob)
    assert frame.params.temperature == 1.0
    assert type(frame.params.temperature) is float
    assert type(frame.params.top_p) is float


def test_nan_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match=r"temperature must be a finite number \(got nan\)"):
        GenerateParams(prompt="x", temperature=math.nan)
    body = {"worker_id": "w", "fraction": math.nan}
    with pytest.raises(InvalidRequest, match=r"fraction must be a finite number \(got nan\)"):
        decode(_frame_bytes("worker_loading", body))


def test_list_over_max_len_is_rejected() -> None:
    ok = GenerateParams(prompt="x", stop=["s"] * MAX_STOP_STRINGS)
    assert len(ok.stop) == MAX_STOP_STRINGS
    too_many = ["s"] * (MAX_STOP_STRINGS + 1)
    with pytest.raises(InvalidRequest, match=f"stop must have at most {MAX_STOP_STRINGS} items"):
        GenerateParams(prompt="x", stop=too_many)
    with pytest.raises(InvalidRequest, match="stop must have at most"):
        decode(
            _frame_bytes("run_job", {"job_id": "j", "params": {"prompt": "x", "stop": too_many}})
        )


def test_default_list_cap_applies_without_max_len() -> None:
    workers = [WORKER] * (schema.MAX_LIST_ITEMS + 1)
    with pytest.raises(InvalidRequest, match=f"workers must have at most {schema.MAX_LIST_ITEMS}"):
        WorkerList(workers=workers)


def test_string_over_max_len_is_rejected() -> None:
    Cancel(job_id="j" * 64)
    with pytest.raises(InvalidRequest, match=r"job_id must be at most 64 long \(got 65\)"):
        Cancel(job_id="j" * 65)
    with pytest.raises(InvalidRequest, match="job_id must be at most 64 long"):
        decode(_frame_bytes("cancel", {"job_id": "j" * 65}))


def test_wrong_type_for_list_and_text() -> None:
    with pytest.raises(InvalidRequest) as exc:
        decode(_frame_bytes("worker_list", {"workers": "nope"}))
    assert "workers must be a list (got str)" in exc.value.message
    with pytest.raises(InvalidRequest, match="job_id must be text"):
        decode(_frame_bytes("cancel", {"job_id": 5}))
    with pytest.raises(InvalidRequest, match=r"frames\[0\] must be bytes"):
        decode(_frame_bytes("frames_reply", {"job_id": "j", "frames": ["text"]}))


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (
            EnsureWorker,
            {"model": "m", "backend": "metal"},
            "backend must be one of auto, cpu, cuda",
        ),
        (
            Done,
            {
                "job_id": "j",
                "seq": 0,
                "tokens": 0,
                "prompt_tokens": 0,
                "ttft_s": 0,
                "decode_s": 0,
                "stop_reason": "tired",
            },
            "stop_reason must be one of",
        ),
        (
            HelloReply,
            {
                "node": "n",
                "rbee_version": "1",
                "protocol_version": 1,
                "pid": 1,
                "stream_port": 1,
                "status": "ok?",
            },
            "status must be one of ok, draining",
        ),
    ],
)
def test_choices_are_enforced(cls: type[Frame], kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidRequest, match=expected):
        cls(**kwargs)
    with pytest.raises(InvalidRequest, match=expected):
        decode(_frame_bytes(cls.TYPE, kwargs))


def test_worker_info_state_choices() -> None:
    for state in ("loading", "idle", "busy", "stopping"):
        assert dataclasses.replace(WORKER, state=state).state == state
    with pytest.raises(InvalidRequest, match="state must be one of loading, idle, busy, stopping"):
        dataclasses.replace(WORKER, state="sleeping")


def test_numeric_bounds() -> None:
    hello_reply = SAMPLES[1]
    assert isinstance(hello_reply, HelloReply)
    assert dataclasses.replace(hello_reply, stream_port=65535).stream_port == 65535
    with pytest.raises(InvalidRequest, match="stream_port must be ≤ 65535"):
        dataclasses.replace(hello_reply, stream_port=65536)
    with pytest.raises(InvalidRequest, match="seed must be ≥ -1"):
        GenerateParams(prompt="x", seed=-2)
    assert GenerateParams(prompt="x", seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(InvalidRequest, match="seed must be ≤ 4294967295"):
        GenerateParams(prompt="x", seed=2**32)


def test_nested_record_of_wrong_type_when_built_directly() -> None:
    with pytest.raises(InvalidRequest, match="params must be a GenerateParams"):
        RunJob(job_id="j", params={"prompt": "x"})  # type: ignore[arg-type]


def test_records_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PARAMS.prompt = "changed"  # type: ignore[misc]


# --------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\x81\xa1v", b"not msgpack at all", b"\xde\xff\xff"],
    ids=["empty", "reserved-byte", "truncated-array", "truncated-map", "text", "huge-map-hdr"],
)
def test_non_msgpack_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_extra_data_after_the_frame() -> None:
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode(encode(Status()) + b"\x00")


@pytest.mark.parametrize("obj", [[1, "status", 0, {}], "status", 5, None, b"bytes"])
def test_frame_that_is_not_a_map(obj: Any) -> None:
    with pytest.raises(ProtocolError, match="frame must be a map"):
        decode(_pack(obj))


def test_non_string_map_keys_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        decode(_pack({1: 1, "t": "status"}))


@pytest.mark.parametrize(
    "version",
    [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 99, str(PROTOCOL_VERSION), None],
)
def test_wrong_version(version: Any) -> None:
    obj = {"t": "status", "r": 0, "b": {}}
    if version is not None:
        obj["v"] = version
    with pytest.raises(VersionMismatch) as exc:
        decode(_pack(obj))
    assert f"version {version!r}" in exc.value.message
    assert f"speaks {PROTOCOL_VERSION}" in exc.value.message
    assert exc.value.suggestion


@pytest.mark.parametrize("version", [True, float(PROTOCOL_VERSION)])
def test_version_that_only_equals_ours(version: Any) -> None:
    with pytest.raises(VersionMismatch):
        decode(_pack({"v": version, "t": "status", "r": 0, "b": {}}))


def test_version_is_checked_before_the_type() -> None:
    with pytest.raises(VersionMismatch):
        decode(_pack({"v": PROTOCOL_VERSION + 1, "t": "no-such-type"}))


@pytest.mark.parametrize("type_name", ["nope", "", "Status", 5, None, ["status"]])
def test_unknown_type(type_name: Any) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        decode(_pack({"v": PROTOCOL_VERSION, "t": type_name, "r": 0, "b": {}}))


def test_missing_type() -> None:
    with pytest.raises(ProtocolError, match="unknown frame type None"):
        decode(_pack({"v": PROTOCOL_VERSION, "b": {}}))


@pytest.mark.parametrize("rid", [-1, True, False, 1.5, "7", None, 2**63])
def test_bad_request_id(rid: Any) -> None:
    with pytest.raises(ProtocolError, match="request id must be a non-negative integer"):
        decode(_pack({"v": PROTOCOL_VERSION, "t": "status", "r": rid, "b": {}}))


def test_largest_request_id_is_fine() -> None:
    assert decode(encode(Status(), rid=2**63 - 1)).rid == 2**63 - 1


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_body_that_is_not_a_map(body: Any) -> None:
    with pytest.raises(InvalidRequest, match="must be a map"):
        decode(_frame_bytes("status", body))


def test_nested_invalid_params() -> None:
    body = {"job_id": "j", "model": "m", "params": {"prompt": "x", "top_k": -5}}
    with pytest.raises(InvalidRequest) as exc:
        decode(_frame_bytes("start_job", body))
    assert exc.value.message.startswith("invalid StartJob: params is invalid (")
    assert "params.top_k must be ≥ 0 (got -5)" in exc.value.message


@pytest.mark.parametrize("params", [None, [], "prompt", 7])
def test_nested_params_of_wrong_shape(params: Any) -> None:
    with pytest.raises(InvalidRequest, match="params is invalid"):
        decode(_frame_bytes("run_job", {"job_id": "j", "params": params}))


def test_invalid_item_in_nested_list() -> None:
    good = WORKER.to_wire()
    bad = {**good, "pid": -1, "state": "zombie"}
    with pytest.raises(InvalidRequest) as exc:
        decode(_frame_bytes("worker_list", {"workers": [good, bad]}))
    msg = exc.value.message
    assert "workers[1] is invalid" in msg
    assert "pid must be ≥ 0" in msg
    assert "state must be one of" in msg
    assert "workers[0]" not in msg


def test_oversize_frame_is_refused_before_parsing() -> None:
    data = bytes(MAX_FRAME_BYTES + 1)  # zero-filled: cheap, and not a valid frame anyway
    with pytest.raises(ProtocolError, match=f"{MAX_FRAME_BYTES + 1} bytes exceeds"):
        decode(data)


def test_decode_as() -> None:
    data = encode(Token(job_id="j", seq=0, text="a"))
    assert isinstance(decode_as(data, Token), Token)
    with pytest.raises(ProtocolError, match="expected a done frame, got token"):
        decode_as(data, Done)


# --------------------------------------------------------------------------- fuzzing


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        if op == 0 and buf:  # flip bits of one byte
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # replace a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # truncate
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif buf:  # delete a short range
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 4)]
    return bytes(buf)


def _decode_or_rbee_error(data: bytes) -> Envelope | RbeeError:
    try:
        return decode(data)
    except RbeeError as exc:
        assert type(exc) in (ProtocolError, VersionMismatch, InvalidRequest), repr(exc)
        return exc
    except Exception as exc:  # pragma: no cover - only on failure
        pytest.fail(f"decode({data!r}) raised {type(exc).__name__}: {exc}")


def test_fuzz_byte_mutations() -> None:
    rng = random.Random(20240601)
    seeds = [encode(f, rid=i) for i, f in enumerate(SAMPLES)]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(4000):
        result = _decode_or_rbee_error(_mutate(rng, rng.choice(seeds)))
        outcomes["ok" if isinstance(result, Envelope) else "error"] += 1
    assert outcomes["error"] > 1000  # the mutations really break frames
    assert outcomes["ok"] > 50  # ... and some still decode (e.g. a changed character)


_WEIRD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    2**64 - 1,
    -(2**63),
    1.5,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "x" * 70,
    "loading",
    b"",
    b"\xff",
    [],
    [1],
    ["a"],
    [{}],
    {},
    {"prompt": "p"},
    {"a": [1, {"b": None}]},
]


def test_fuzz_structured_field_values() -> None:
    """Replace body fields with values of every kind; decode must answer with rbee errors."""
    rng = random.Random(7)
    bodies = [(f.TYPE, f.to_wire()) for f in SAMPLES]
    valid = 0
    for _ in range(3000):
        type_name, body = rng.choice(bodies)
        body = dict(body)
        for _ in range(rng.randint(1, 3)):
            keys = [*body, "unknown_field"]
            body[rng.choice(keys)] = rng.choice(_WEIRD_VALUES)
        if body and rng.random() < 0.2:
            del body[rng.choice(list(body))]
        envelope = {"v": PROTOCOL_VERSION, "t": type_name, "r": rng.randrange(100), "b": body}
        result = _decode_or_rbee_error(_pack(envelope))
        if isinstance(result, Envelope):
            valid += 1
            # what decodes also re-encodes and decodes to the same frame
            assert decode(encode(result.frame, result.rid)) == result
    assert valid > 0


def test_the_token_fast_path_accepts_and_refuses_exactly_what_the_generic_path_does() -> None:
    """decode() checks Token frames by hand (the stream's hot path); it must agree with the
    generic record checks on every body, valid or not."""
    rng = random.Random(7)
    good: dict[str, list[Any]] = {
        "job_id": ["j-1", "J.x:y_z-0", "j" * 64],
        "seq": [0, 1, 2**40],
        "text": ["", " w1", "é€😀", "x" * 4096],
        "token_id": [-1, 0, 151_000],
        "count": [1, 2, 4096],
    }
    bad: dict[str, list[Any]] = {
        "job_id": ["", "-j", "j/../x", "j" * 65, 5, None, b"j-1"],
        "seq": [-1, True, 1.0, "1", None],
        "text": ["x" * 4097, 3, None, b"x"],
        "token_id": [-2, False, 2.5, "0"],
        "count": [0, -1, 4097, True, 1.0, None],
    }
    agreed = accepted = 0
    for _ in range(4000):
        body = {
            k: rng.choice(good[k] if rng.random() < 0.9 else bad[k])
            for k in good
            if rng.random() < 0.97
        }
        if rng.random() < 0.1:
            body["extra"] = "ignored"
        data = msgpack.packb({"v": PROTOCOL_VERSION, "t": "token", "r": 0, "b": body})
        try:
            expected: Any = schema.record_from_wire(Token, body)
        except InvalidRequest:
            expected = None
        try:
            got: Any = decode(data).frame
        except InvalidRequest:
            got = None
        assert got == expected, body
        assert got is None or type(got) is Token
        agreed += 1
        accepted += got is not None
    assert agreed == 4000 and 1000 < accepted < 3900, accepted
