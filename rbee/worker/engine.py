"""llama.cpp behind one small interface: load a GGUF, turn a request into tokens, generate.

Generation drives ``Llama.generate()`` (the engine's own speed) with rbee's incremental,
UTF-8-safe detokenizer instead of ``create_completion``, whose per-token Python work can cost most
of the engine's speed (shared/GPU.md). Prompts are tokenized exactly as llama-cpp-python's own
completion and chat functions do, so greedy output matches them token for token.

CPU: a worker runs ``threads`` threads for generation and prompt processing alike (by default
as many as llama.cpp's own tools: rbee.llamacpp.default_threads), and loads with llama.cpp's
extra buffer types (weights repacked for AMX or AVX-512 kernels) only where the hive's engine
probe saw them work on this machine (rbee.hive.probe): on some CPUs decoding through them
crashes.

Backends: ``cpu`` loads no layer on a GPU; ``cuda`` loads every layer on one GPU (split mode
none, ``main_gpu`` as CUDA numbers the devices this process sees). A CUDA request on a build
without GPU support raises BACKEND_UNAVAILABLE: llama.cpp itself would quietly run on the CPU.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rbee.errors import BackendUnavailable, InvalidModel, InvalidRequest
from rbee.llamacpp import EngineChoice, default_threads, import_llama, loaded_variant
from rbee.protocol.messages import DEFAULT_CTX_TOKENS, SYNTHETIC_PREFIX, GenerateParams

LLAMA_LOG_LINES = 20
GGML_LOG_WARN = 3  # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
GGML_LOG_CONT = 5

ALL_LAYERS = -1  # llama-cpp-python's n_gpu_layers for "every layer"
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")

ProgressFn = Callable[[float], None]

LLAMA_LOG: deque[str] = deque(maxlen=LLAMA_LOG_LINES)  # llama.cpp's latest warnings and errors
_log_state = {"keep": False}
_offloaded = {"layers": 0, "of": 0}  # from llama.cpp's "offloaded N/M layers to GPU" line
_log_callback: Any = None  # the ctypes callback must outlive every call into llama.cpp


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it releases (empty while text is held back)."""

    token_id: int
    text: str


@dataclass
class Outcome:
    """How a generation ended, filled in as it runs."""

    stop_reason: str = "length"
    prompt_tokens: int = 0
    tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    tail: str = ""


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


class Engine:
    """One loaded model. Not thread-safe: one generation at a time, from one thread."""

    def __init__(
        self,
        model_path: str,
        n_ctx: int,
        on_progress: ProgressFn,
        backend: str = "cpu",
        main_gpu: int = 0,
        threads: int = 0,
        extra_bufts: bool = True,
    ) -> None:
        """Load ``model_path`` with a context of ``n_ctx`` tokens (0: DEFAULT_CTX_TOKENS) on
        ``backend``; for ``cuda``, every layer goes to GPU ``main_gpu``. ``threads`` 0 means
        rbee's default; ``extra_bufts`` False loads without llama.cpp's repacked weights."""
        try:
            llama_cpp = import_llama()
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise InvalidModel(f"llama-cpp-python is not importable: {exc}") from None
        self._llama_cpp = llama_cpp
        self.backend = backend
        capture_llama_log(llama_cpp)
        placement = gpu_params(llama_cpp, backend, main_gpu)
        _offloaded.update(layers=0, of=0)
        self.threads = threads or default_threads()
        with _load_params(llama_cpp, on_progress, extra_bufts):
            try:
                self.llama: Any = llama_cpp.Llama(
                    model_path=model_path,
                    n_ctx=n_ctx or DEFAULT_CTX_TOKENS,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    flash_attn=True,  # "auto" (see _load_params), as llama.cpp decides
                    verbose=False,
                    **placement,
                )
            except (ValueError, RuntimeError, OSError) as exc:
                said = "".join(LLAMA_LOG).strip()
                raise InvalidModel(
                    f"llama.cpp could not load {model_path}: {exc}"
                    + (f"\nllama.cpp said:\n{said}" if said else "")
                ) from None
        self.template: str = self.llama.metadata.get("tokenizer.chat_template", "")
        self.gpu_layers = _offloaded["layers"] if backend == "cuda" else 0
        if backend == "cuda" and _offloaded["of"] and self.gpu_layers < _offloaded["of"]:
            raise BackendUnavailable(
                f"llama.cpp put only {self.gpu_layers} of {_offloaded['of']} layers on the GPU"
            )

    @property
    def n_ctx(self) -> int:
        """The context size the model was loaded with, in tokens."""
        return int(self.llama.n_ctx())

    @property
    def has_chat_template(self) -> bool:
        """Whether prompts are wrapped in the model's chat template unless ``raw``."""
        return bool(self.template)

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most bytes one token of this vocabulary stands for (read once, ~50 ms)."""
        vocab = range(self.llama.n_vocab())
        return max((len(self.llama.detokenize([t])) for t in vocab), default=1) or 1

    def _tokenize(self, text: bytes, add_bos: bool) -> list[int]:
        """Tokens of ``text``; a text that cannot fit the context is refused before the
        tokenizer runs (it needs at least len/longest-token tokens, and tokenizing megabytes
        would hold the worker for seconds)."""
        at_least = len(text) // self.longest_token_bytes
        if at_least > self.n_ctx:
            raise self._too_long(f"at least {at_least}")
        return list(self.llama.tokenize(text, add_bos=add_bos, special=True))

    def _too_long(self, count: str) -> InvalidRequest:
        return InvalidRequest(
            f"the prompt has {count} tokens but the context holds {self.n_ctx}",
            suggestion="shorten the prompt or load the model with a larger context",
        )

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        """Tokenize as create_completion (raw) or create_chat_completion (chat) would; a chat is
        ``params.messages`` when given, else one user turn holding the prompt."""
        if params.raw or not self.template:
            return self._tokenize(params.prompt.encode(), add_bos=True)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos = self.llama.token_eos()
        bos = self.llama.token_bos()
        fmt = Jinja2ChatFormatter(
            template=self.template,
            eos_token=self.llama._model.token_get_text(eos) if eos >= 0 else "",
            bos_token=self.llama._model.token_get_text(bos) if bos >= 0 else "",
            stop_token_ids=[eos],
        )
        messages: list[Any] = [m.to_wire() for m in params.messages] or [
            {"role": "user", "content": params.prompt}
        ]
        result = fmt(messages=messages)
        return self._tokenize(result.prompt.encode(), add_bos=not result.added_special)

    def generate(
        self, params: GenerateParams, cancel: threading.Event, outcome: Outcome
    ) -> Iterator[Piece]:
        """Yield one Piece per generated token; ``outcome`` holds the totals at the end."""
        started = time.perf_counter()
        tokens = self.prompt_tokens(params)
        outcome.prompt_tokens = len(tokens)
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise self._too_long(str(len(tokens)))
        limit = min(params.max_tokens, room)
        if params.seed >= 0:
            self.llama.set_seed(params.seed)
        else:
            self.llama.set_seed(int.from_bytes(os.urandom(4), "little"))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = StopMatcher(params.stop)
        vocab = self.llama._model.vocab
        is_eog = self._llama_cpp.llama_token_is_eog
        first_at = 0.0
        outcome.stop_reason = "length"
        for token in self.llama.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.05,
            temp=params.temperature,
            repeat_penalty=1.0,
            reset=True,
        ):
            if outcome.tokens == 0:
                first_at = time.perf_counter()
                outcome.ttft_s = first_at - started
            if is_eog(vocab, token) and not params.ignore_eos:
                outcome.stop_reason = "eos"
                break
            outcome.tokens += 1
            text, hit = matcher.feed(decoder.decode(self.llama.detokenize([token])))
            yield Piece(token_id=int(token), text=text)
            if hit:
                outcome.stop_reason = "stop"
                break
            if cancel.is_set():
                outcome.stop_reason = "canceled"
                break
            if outcome.tokens >= limit:
                break
        if outcome.stop_reason != "stop":
            outcome.tail = matcher.feed(decoder.decode(b"", final=True))[0] + matcher.flush()
        outcome.decode_s = time.perf_counter() - first_at if first_at else 0.0


class SyntheticEngine:
    """A stand-in model that emits numbered words at a fixed rate (0: as fast as it can).

    It measures rbee's own cost (transport, relay, keeper) without llama.cpp in the way, for
    benchmarks and for tests that need more tokens than a real model makes in a few seconds.
    Reference: ``synthetic:TOKENS_PER_S``, accepted only by a loopback-only hive.
    """

    n_ctx = 1 << 20
    has_chat_template = False

    def __init__(self, reference: str) -> None:
        rate = reference.removeprefix(SYNTHETIC_PREFIX) or "0"
        try:
            self.interval_s = 1.0 / float(rate) if float(rate) > 0 else 0.0
        except ValueError:
            raise InvalidModel(f"bad synthetic model {reference!r}: want synthetic:RATE") from None

    def generate(
        self, params: GenerateParams, cancel: threading.Event, outcome: Outcome
    ) -> Iterator[Piece]:
        """Yield ``max_tokens`` words, paced at the configured rate."""
        started = time.perf_counter()
        outcome.prompt_tokens = len(params.prompt.split())
        next_at = started
        for i in range(params.max_tokens):
            if self.interval_s:
                next_at += self.interval_s
                time.sleep(max(0.0, next_at - time.perf_counter()))
            if i == 0:
                outcome.ttft_s = time.perf_counter() - started
            outcome.tokens += 1
            yield Piece(token_id=i, text=f" w{i}")
            if cancel.is_set():
                outcome.stop_reason = "canceled"
                break
        else:
            outcome.stop_reason = "length"
        outcome.decode_s = time.perf_counter() - started - outcome.ttft_s


def open_engine(
    model_path: str,
    n_ctx: int,
    on_progress: ProgressFn,
    backend: str = "cpu",
    main_gpu: int = 0,
    threads: int = 0,
    extra_bufts: bool = True,
) -> Engine | SyntheticEngine:
    """The engine for a model path: llama.cpp, or the synthetic stand-in (which ignores the
    backend: it computes nothing)."""
    if model_path.startswith(SYNTHETIC_PREFIX):
        on_progress(1.0)
        return SyntheticEngine(model_path)
    return Engine(model_path, n_ctx, on_progress, backend, main_gpu, threads, extra_bufts)


def in_process(model_path: str, choice: EngineChoice, n_ctx: int = DEFAULT_CTX_TOKENS) -> Any:
    """A plain ``llama_cpp.Llama`` loaded exactly as a hive's worker loads it (threads, extra
    buffer types, CPU variant): the in-process baseline of tests and benchmarks."""
    import_llama()  # loads the probed variant, unless this process loaded another one already
    running = loaded_variant()
    if choice.running and running and running != choice.running:
        raise InvalidModel(
            f"this process runs llama.cpp's {running} CPU variant, workers {choice.running}"
        )
    engine = Engine(
        model_path, n_ctx, lambda _f: None, threads=choice.threads, extra_bufts=choice.extra_bufts
    )
    return engine.llama


def gpu_params(llama_cpp: Any, backend: str, main_gpu: int) -> dict[str, Any]:
    """``Llama()``'s placement arguments for a backend; refuses CUDA on a CPU-only build."""
    if backend == "cpu":
        return {"n_gpu_layers": 0}
    if backend != "cuda":
        raise BackendUnavailable(f"a worker cannot run on the {backend} backend")
    if not llama_cpp.llama_supports_gpu_offload():
        raise BackendUnavailable(
            "this llama.cpp build has no GPU support, so it cannot run a model on CUDA",
            suggestion="install the CUDA build of llama-cpp-python (packaging/cuda/build.sh)",
        )
    return {
        "n_gpu_layers": ALL_LAYERS,
        "main_gpu": main_gpu,
        "split_mode": int(llama_cpp.LLAMA_SPLIT_MODE_NONE),
    }


def capture_llama_log(llama_cpp: Any) -> None:
    """Keep llama.cpp's warnings and errors, which say why a load failed.

    llama-cpp-python silences llama.cpp's stderr while loading unless verbose, which would hide
    the one line that explains a broken model file; this callback keeps those lines in memory.
    """
    global _log_callback
    if _log_callback is not None:
        return

    def on_log(level: int, text: bytes, _user: Any) -> None:
        keep = _log_state["keep"] if level == GGML_LOG_CONT else level >= GGML_LOG_WARN
        _log_state["keep"] = keep
        if keep:
            LLAMA_LOG.append(text.decode("utf-8", "replace"))
        elif b"offloaded" in text:  # the one info line that says where the layers went
            found = OFFLOADED.search(text.decode("utf-8", "replace"))
            if found:
                _offloaded.update(layers=int(found[1]), of=int(found[2]))

    _log_callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


@contextmanager
def _load_params(llama_cpp: Any, on_progress: ProgressFn, extra_bufts: bool) -> Iterator[None]:
    """Hook llama.cpp's model-loading progress callback, set whether it may use extra buffer
    types, and let llama.cpp decide on flash attention, for the duration of one load.

    llama-cpp-python builds its parameters inside ``Llama.__init__`` and offers no parameter for
    the first two, so the default-params factory is wrapped while loading. For flash attention
    it offers on or off, where llama.cpp's own default (llama-server's) is "auto": on wherever
    the device supports it for the model (on this project's CPUs 7-13 % more tokens/s for the
    default model). ``Llama(flash_attn=True)`` reads the "enabled" constant from the module, so
    that constant says "auto" while loading.
    """
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params
    enabled = module.LLAMA_FLASH_ATTN_TYPE_ENABLED
    callback_type = module.llama_progress_callback

    def report(fraction: float, _user: Any) -> bool:
        on_progress(max(0.0, min(1.0, float(fraction))))
        return True

    c_callback = callback_type(report)

    def params_with_progress() -> Any:
        params = original()
        params.progress_callback = c_callback
        params.progress_callback_user_data = ctypes.c_void_p(0)
        params.use_extra_bufts = extra_bufts
        return params

    module.llama_model_default_params = params_with_progress
    module.LLAMA_FLASH_ATTN_TYPE_ENABLED = module.LLAMA_FLASH_ATTN_TYPE_AUTO
    try:
        yield
    finally:
        module.llama_model_default_params = original
        module.LLAMA_FLASH_ATTN_TYPE_ENABLED = enabled
