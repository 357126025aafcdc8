"""Continuous batching: up to N jobs share one loaded model, one decode step at a time.

Each step builds one batch: the next token of every generating sequence, then as much of the
waiting prompts as fits (``batch_tokens`` in all), so a long prompt is prefilled in chunks that
share steps with the running streams instead of stalling them. After the step every sequence
whose logits came out samples its own next token with its own sampler chain, and its text goes
out as a Token frame. A job that ends (end of generation, a stop string, its token limit, a
cancel) frees its slot at once, and the next job starts in the very next step.

A free slot keeps the tokens its last job left in the KV cache; a new job goes to the free slot
whose cache shares the longest prefix with its prompt and computes only the rest (as
llama-server's ``cache_prompt``): a follow-up turn of a conversation skips the whole history.

Per token, the loop does a list lookup for the token's bytes, an incremental UTF-8 decode, and
one msgpack pack: nothing that calls into llama.cpp beyond the one sampling call.

Tokens that come faster than the stream interval (the hive's ``--stream-interval-ms``, 25) go
out together: a stream's first token is sent at once, a later one as soon as the interval has
passed since the last frame, the rest with the next token (at most one step later) or at the
end. Every frame wakes the hive's relay, the gateway and the client once; on a machine whose
cores all decode, each wake-up takes a core from llama.cpp's spinning threads, so at 100
tokens/s on two cores one frame per token cost a tenth of the speed. 25 ms (40 frames a second)
is below what a reader sees; a model slower than that sends every token alone, as before.
(vLLM's ``--stream-interval`` does the same, counted in tokens.)
"""

from __future__ import annotations

import codecs
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from rbee.errors import InternalError, InvalidModel, InvalidRequest, JobStopped, RbeeError
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    PROTOCOL_VERSION,
    STREAM_INTERVAL_MS,
    SYNTHETIC_PREFIX,
    Done,
    Frame,
    GenerateParams,
    RunJob,
    StreamError,
    Token,
    TokenProb,
)
from rbee.worker.embedding import Embedding

FAST_TEXT_CHARS = 1024  # longer token text (held-back stop text) takes the validated path
MAX_MESSAGE_CHARS = 8000

Publish = Callable[[bytes, bytes], None]  # (topic, frame bytes): one stream frame out


class Model(Protocol):
    """What the batch loop needs of a loaded model (rbee.worker.engine.Engine, or the
    synthetic stand-in below)."""

    slots: int
    batch_tokens: int

    @property
    def pooled(self) -> bool: ...

    @property
    def n_ctx(self) -> int: ...
    @property
    def pieces(self) -> Sequence[bytes]: ...
    @property
    def batch(self) -> BatchLike: ...

    def prompt_tokens(self, params: GenerateParams) -> list[int]: ...
    def too_long(self, count: str) -> RbeeError: ...
    def is_eog(self, token: int) -> bool: ...
    def new_sampler(self, params: GenerateParams) -> Any: ...
    def free_sampler(self, sampler: Any) -> None: ...
    def sample(self, sampler: Any, row: int) -> int: ...
    def forget(self, seq: int, from_pos: int) -> bool: ...
    def decode(self) -> None: ...
    def embedding_tokens(self, text: str, truncate: bool) -> list[int]: ...
    def embed(self, seq: int, tokens: Sequence[int], first_pos: int) -> Any: ...
    def token_prob(self, row: int, token: int, top: int) -> TokenProb: ...


class BatchLike(Protocol):
    """The batch a Model decodes: rows of (sequence, token, position, logits wanted)."""

    size: int

    def clear(self) -> None: ...
    def add(self, seq: int, tokens: Sequence[int], first_pos: int, logits_last: bool) -> int: ...


class StopMatcher:
    """Releases generated text, holding back whatever could still become a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        """Release what is still held when generation ends without a stop string."""
        out, self.held = self.held, ""
        return out


class TokenFrames:
    """One job's Token frames, encoded fast: the job id is validated once, not per token, and
    each frame is packed directly, byte for byte what ``encode(Token(…))`` gives (a unit test
    holds it to that); the hive still validates every frame it relays."""

    def __init__(self, job_id: str) -> None:
        Token(job_id=job_id, seq=0, text="")  # raises if the id is not a valid job id
        self.job_id = job_id
        self.packer = msgpack.Packer()

    def encode(
        self,
        seq: int,
        text: str,
        token_id: int,
        count: int = 1,
        probs: list[TokenProb] | None = None,
    ) -> bytes:
        """The bytes ``encode(Token(job_id, seq, text, token_id, count))`` would give (a frame
        with log probabilities takes the validated path: they are asked for rarely)."""
        if (
            probs
            or len(text) > FAST_TEXT_CHARS
            or seq < 0
            or token_id < -1
            or not 1 <= count <= 4096
        ):
            frame = Token(
                job_id=self.job_id,
                seq=seq,
                text=text,
                token_id=token_id,
                count=count,
                probs=probs or [],
            )
            return encode(frame)
        body = {"job_id": self.job_id, "seq": seq, "text": text, "token_id": token_id}
        body["count"] = count
        body["probs"] = []
        data: bytes = self.packer.pack({"v": PROTOCOL_VERSION, "t": Token.TYPE, "r": 0, "b": body})
        return data


@dataclass(eq=False)
class Job:
    """One job running in a slot: its stream, its text state and its totals so far."""

    job_id: str
    params: GenerateParams
    cancel: threading.Event
    sampler: Any
    limit: int  # tokens it may generate (its max_tokens, within the slot's context)
    prompt_tokens: int
    started: float
    frames: TokenFrames
    topic: bytes
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    matcher: StopMatcher = field(default_factory=lambda: StopMatcher([]))
    seq: int = 0  # the next frame's sequence number
    tokens: int = 0
    first_at: float = 0.0
    unsent: str = ""  # text of tokens not sent yet (they came within the stream interval)
    unsent_tokens: int = 0
    unsent_probs: list[TokenProb] = field(default_factory=list)  # when logprobs were asked for
    last_token: int = -1
    sent_at: float = 0.0
    order: int = 0  # when it was admitted: waiting prompts are read first come, first served
    embedding: Embedding | None = None  # an embedding job's inputs and vectors


@dataclass(eq=False)
class Slot:
    """One sequence of the context: the tokens in its KV cache, and the job using it."""

    seq: int
    cached: list[int] = field(default_factory=list)  # the tokens its KV cells hold, in order
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    next_token: int = -1  # sampled, to be decoded in the next step
    row: int = -1  # the batch row holding its logits this step (-1: none)


def common_prefix(a: Sequence[object], b: Sequence[object]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Slots:
    """The batch loop over one model's slots. Driven by one thread: ``admit`` jobs, ``step``
    while ``busy``; every frame goes out through ``publish``."""

    def __init__(
        self, model: Model, publish: Publish, interval_s: float = STREAM_INTERVAL_MS / 1000
    ) -> None:
        self.model = model
        self.publish = publish
        self.interval_s = interval_s
        self.slots = [Slot(seq) for seq in range(model.slots)]
        self.backlog: deque[tuple[RunJob, threading.Event]] = deque()
        self.pieces = model.pieces
        self.order = itertools.count()

    def free(self) -> int:
        """Slots without a job."""
        return sum(1 for s in self.slots if s.job is None)

    def busy(self) -> bool:
        """Whether a step has work to do."""
        return bool(self.backlog) or any(s.job is not None for s in self.slots)

    def running(self) -> list[str]:
        """The ids of the jobs in slots."""
        return [s.job.job_id for s in self.slots if s.job is not None]

    def admit(self, run: RunJob, cancel: threading.Event) -> None:
        """Take a job: into a free slot now, or (should the hive send more than there are
        slots) as soon as one frees."""
        self.backlog.append((run, cancel))
        self._fill()

    def _fill(self) -> None:
        while self.backlog and self.free():
            run, cancel = self.backlog.popleft()
            try:
                self._start(run, cancel)
            except RbeeError as exc:
                self._send_error(run.job_id, 0, exc)
            except Exception as exc:  # a template or tokenizer failure ends only this job
                self._send_error(run.job_id, 0, InternalError.of(exc))

    def _start(self, run: RunJob, cancel: threading.Event) -> None:
        started = time.perf_counter()
        frames = TokenFrames(run.job_id)
        if run.params.inputs:
            self._start_embedding(run, cancel, started, frames)
            return
        prompt = self.model.prompt_tokens(run.params)
        room = self.model.n_ctx - len(prompt)
        if room <= 0:
            raise self.model.too_long(str(len(prompt)))
        sampler = self.model.new_sampler(run.params)  # a bad grammar fails here, nothing changed
        free = [s for s in self.slots if s.job is None]
        slot = max(free, key=lambda s: common_prefix(s.cached, prompt))
        keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1)  # recompute >= 1 token
        if not run.params.cache_prompt:
            keep = 0
        if not self.model.forget(slot.seq, keep):
            self.model.forget(slot.seq, 0)
            keep = 0
        slot.cached = slot.cached[:keep]
        slot.pending = prompt[keep:]
        slot.next_token = -1
        slot.job = Job(
            job_id=run.job_id,
            params=run.params,
            cancel=cancel,
            sampler=sampler,
            limit=min(run.params.max_tokens, room),
            prompt_tokens=len(prompt),
            started=started,
            frames=frames,
            topic=run.job_id.encode(),
            matcher=StopMatcher(run.params.stop),
            order=next(self.order),
        )

    def _start_embedding(
        self, run: RunJob, cancel: threading.Event, started: float, frames: TokenFrames
    ) -> None:
        """An embedding job takes the free slot whose cache is worth least."""
        inputs = [self.model.embedding_tokens(t, run.params.truncate) for t in run.params.inputs]
        slot = min((s for s in self.slots if s.job is None), key=lambda s: len(s.cached))
        slot.cached = []
        embedding = Embedding(inputs)
        slot.job = Job(
            job_id=run.job_id,
            params=run.params,
            cancel=cancel,
            sampler=None,
            limit=0,
            prompt_tokens=embedding.tokens,
            started=started,
            frames=frames,
            topic=run.job_id.encode(),
            order=next(self.order),
            embedding=embedding,
        )

    def step(self) -> None:
        """One decode step for every slot with a job; then sample, publish, end what ended;
        then one chunk of the first embedding job. A job canceled since the last step ends
        first (a cancel costs no more compute)."""
        self._end_canceled()
        self._fill()
        self._generate()
        self._embed()

    def _generate(self) -> None:
        model, batch = self.model, self.model.batch
        batch.clear()
        generating = [
            s for s in self.slots if s.job is not None and not s.pending and not s.job.embedding
        ]
        for slot in generating:
            slot.row = batch.add(slot.seq, (slot.next_token,), len(slot.cached), True)
            slot.cached.append(slot.next_token)
        prefilling = sorted(
            (s for s in self.slots if s.job is not None and s.pending),
            key=lambda s: s.job.order if s.job is not None else 0,
        )
        for slot in prefilling:
            room = model.batch_tokens - batch.size
            if room <= 0:
                slot.row = -1
                continue
            chunk, slot.pending = slot.pending[:room], slot.pending[room:]
            last = batch.add(slot.seq, chunk, len(slot.cached), not slot.pending)
            slot.row = -1 if slot.pending else last  # logits only once the prompt is read
            slot.cached.extend(chunk)
        try:
            if batch.size:
                model.decode()
        except RbeeError as exc:
            for slot in generating + prefilling:
                self._fail(slot, exc)
            return
        now = time.perf_counter()
        for slot in generating + prefilling:
            if slot.job is not None and slot.row >= 0:
                try:
                    token = model.sample(slot.job.sampler, slot.row)
                except RbeeError as exc:  # a grammar with no way on: this stream alone ends
                    self._fail(slot, exc)
                    continue
                self._on_token(slot, slot.job, token, now)

    def _embed(self) -> None:
        slots = [s for s in self.slots if s.job is not None and s.job.embedding is not None]
        if not slots:
            return
        slot = min(slots, key=lambda s: s.job.order if s.job is not None else 0)
        job = slot.job
        assert job is not None and job.embedding is not None
        try:
            if job.embedding.step(self.model, slot.seq):
                self._end(slot, "eos")
        except RbeeError as exc:  # an input it cannot read ends this job alone
            self._fail(slot, exc)

    def _end_canceled(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancel.is_set():
                self._end(slot, "canceled")

    def stop(self) -> None:
        """The worker is stopping: canceled jobs end as canceled (with their held-back text),
        any other running or waiting job with JOB_STOPPED."""
        self._end_canceled()
        self.fail_all(JobStopped("the worker is stopping"))

    def _on_token(self, slot: Slot, job: Job, token: int, now: float) -> None:
        if job.tokens == 0:
            job.first_at = now
        # under a grammar, end of generation is the document's end: ignore_eos cannot pass it
        if (job.params.grammar or not job.params.ignore_eos) and self.model.is_eog(token):
            self._end(slot, "eos")
            return
        job.tokens += 1
        text, hit = job.matcher.feed(job.decoder.decode(self.pieces[token]))
        job.unsent += text
        job.unsent_tokens += 1
        if job.params.logprobs >= 0:
            job.unsent_probs.append(self.model.token_prob(slot.row, token, job.params.logprobs))
        job.last_token = token
        if (
            job.seq == 0
            or now - job.sent_at >= self.interval_s
            or len(job.unsent) >= FAST_TEXT_CHARS
        ):
            self._send(job, now)
        if hit:
            self._end(slot, "stop")
        elif job.tokens >= job.limit:
            self._end(slot, "length")
        else:
            slot.next_token = token

    def _send(self, job: Job, now: float) -> None:
        """The job's unsent tokens as one Token frame."""
        frame = job.frames.encode(
            job.seq, job.unsent, job.last_token, job.unsent_tokens, job.unsent_probs
        )
        self.publish(job.topic, frame)
        job.seq += 1
        job.unsent, job.unsent_tokens, job.sent_at = "", 0, now
        job.unsent_probs = []

    def _end(self, slot: Slot, reason: str) -> None:
        """The job's one terminal frame: Done with its totals; the slot is free."""
        job = self._release(slot)
        tail = ""
        if reason != "stop":
            tail = job.matcher.feed(job.decoder.decode(b"", final=True))[0] + job.matcher.flush()
        now = time.perf_counter()
        done = Done(
            job_id=job.job_id,
            seq=job.seq,
            tokens=job.tokens,
            prompt_tokens=job.prompt_tokens,
            ttft_s=(job.first_at or now) - job.started,
            decode_s=now - job.first_at if job.first_at else 0.0,
            stop_reason=reason,
            tail=tail,
            vectors=job.embedding.vectors if job.embedding and reason == "eos" else [],
        )
        self.publish(job.topic, encode(done))

    def _fail(self, slot: Slot, error: RbeeError) -> None:
        """End the slot's job with ``error``; its cache is dropped (it may be half written)."""
        job = self._release(slot)
        self.model.forget(slot.seq, 0)
        slot.cached = []
        self._send_error(job.job_id, job.seq, error)

    def _release(self, slot: Slot) -> Job:
        """Free the slot; the job's unsent tokens go out before its terminal frame."""
        job = slot.job
        assert job is not None
        if job.unsent_tokens:
            self._send(job, time.perf_counter())
        if job.sampler is not None:
            self.model.free_sampler(job.sampler)
        slot.job, slot.pending, slot.row, slot.next_token = None, [], -1, -1
        return job

    def _send_error(self, job_id: str, seq: int, error: RbeeError) -> None:
        frame: Frame = StreamError(
            job_id=job_id, seq=seq, code=error.code, message=error.message[:MAX_MESSAGE_CHARS]
        )
        self.publish(job_id.encode(), encode(frame))

    def fail_all(self, error: RbeeError) -> None:
        """End every job, running or waiting, with ``error`` (the loop cannot go on)."""
        for slot in self.slots:
            if slot.job is not None:
                self._fail(slot, error)
        while self.backlog:
            run, _ = self.backlog.popleft()
            self._send_error(run.job_id, 0, error)


def run_alone(model: Model, run: RunJob) -> list[Frame]:
    """Every frame of one job run by itself to its end, through the very loop a worker runs:
    the engine probe and the lending checks (whose texts must match a split model's) use it."""
    frames: list[Frame] = []
    slots = Slots(model, lambda _topic, data: frames.append(decode(data).frame))
    slots.admit(run, threading.Event())
    while slots.busy():
        slots.step()
    return frames


# --------------------------------------------------------------------------- the stand-in


class _Words:
    """Token ``i`` of the synthetic model is the word `` wI``."""

    def __getitem__(self, token: int) -> bytes:
        return f" w{token}".encode()

    def __len__(self) -> int:
        return 1 << 20


class _ListBatch:
    """The synthetic model's batch: it only needs to know how full it is."""

    def __init__(self) -> None:
        self.size = 0

    def clear(self) -> None:
        self.size = 0

    def add(self, seq: int, tokens: Sequence[int], first_pos: int, logits_last: bool) -> int:
        self.size += len(tokens)
        return self.size - 1


class SyntheticEngine:
    """A stand-in model that emits numbered words at a fixed rate per stream (0: as fast as it
    can), through the same batch loop as llama.cpp: every step takes one interval.

    It measures rbee's own cost (transport, relay, keeper) without llama.cpp in the way, for
    benchmarks and for tests that need more tokens than a real model makes in a few seconds.
    Reference: ``synthetic:TOKENS_PER_S``, accepted only by a loopback-only hive.
    """

    n_ctx = 1 << 20
    pooled = False
    has_chat_template = False
    gpu_layers = 0
    n_layers = 0
    batch_tokens = 1 << 20
    pieces: Sequence[bytes] = _Words()  # type: ignore[assignment]

    def __init__(self, reference: str, slots: int = 1) -> None:
        rate = reference.removeprefix(SYNTHETIC_PREFIX) or "0"
        try:
            self.interval_s = 1.0 / float(rate) if float(rate) > 0 else 0.0
        except ValueError:
            raise InvalidModel(f"bad synthetic model {reference!r}: want synthetic:RATE") from None
        self.slots = slots
        self.batch = _ListBatch()
        self.next_at = 0.0

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        """One token per word of the prompt (at least one)."""
        return [0] * max(1, len(params.prompt.split()))

    def too_long(self, count: str) -> RbeeError:
        return InternalError(f"a synthetic prompt of {count} tokens")  # pragma: no cover

    def is_eog(self, token: int) -> bool:
        return False

    def new_sampler(self, params: GenerateParams) -> Iterator[int]:
        """The words of one stream, numbered from 0."""
        return itertools.count()

    def free_sampler(self, sampler: Any) -> None:
        pass

    def sample(self, sampler: Iterator[int], row: int) -> int:
        return next(sampler)

    def forget(self, seq: int, from_pos: int) -> bool:
        return True

    def embedding_tokens(self, text: str, truncate: bool) -> list[int]:
        raise InvalidRequest("a synthetic model has no embeddings")

    def token_prob(self, row: int, token: int, top: int) -> TokenProb:
        """Every word is certain."""
        return TokenProb(piece=self.pieces[token], logprob=0.0)

    def embed(self, seq: int, tokens: Sequence[int], first_pos: int) -> Any:
        raise InvalidRequest("a synthetic model has no embeddings")  # pragma: no cover

    def decode(self) -> None:
        """Wait out one interval (all streams share the step, as on a real model)."""
        if not self.interval_s:
            return
        now = time.perf_counter()
        if now - self.next_at > self.interval_s:  # idle since the last step: a new beat
            self.next_at = now
        self.next_at += self.interval_s
        time.sleep(max(0.0, self.next_at - now))
