"""llama.cpp behind one small interface: load a GGUF with N sequence slots, turn a request into
tokens, decode one batch, sample one slot.

The decode loop itself lives in rbee.worker.slots: it drives llama.cpp's low-level API
(``llama_decode`` on one batch holding every running sequence's next token, a sampler chain per
sequence) instead of ``Llama.generate()``, whose per-token Python work costs speed and which can
only run one sequence (shared/GPU.md). Prompts are tokenized exactly as llama-cpp-python's own
completion and chat functions do, and a sequence's sampler chain is the one ``Llama.generate()``
builds, so a lone greedy job's output matches llama-cpp-python token for token.

Slots: the context holds ``slots`` sequences of ``n_ctx`` cells each (llama.cpp's ``n_seq_max``
with a KV cache split per sequence, not unified): each sequence's attention reads only its own
cells and every slot is sure of its whole context. Measured on the 2-core CPU (8 slots, 1-8
streams of the default model) the unified cache was no faster (within the run-to-run spread);
llama.cpp's own comment on ``kv_unified`` advises against it for streams that share no prefix.

CPU: a worker runs ``threads`` threads for generation and prompt processing alike (by default
as many as llama.cpp's own tools: rbee.llamacpp.default_threads), and loads with llama.cpp's
extra buffer types (weights repacked for AMX or AVX-512 kernels) only where the hive's engine
probe saw them work on this machine (rbee.hive.probe): on some CPUs decoding through them
crashes.

Backends: ``cpu`` loads no layer on a GPU; ``cuda`` loads ``gpu_layers`` layers (all by
default) on one GPU (split mode none, ``main_gpu`` as CUDA numbers the devices this process
sees) or, given ``layers`` per GPU, over several (llama.cpp's layer split in those proportions);
layers not on a GPU stay on the CPU (a partial offload, which the hive plans: rbee.hive.fit). A
CUDA request on a build without GPU support raises BACKEND_UNAVAILABLE: llama.cpp itself would
quietly run on the CPU. (Such a build still says it supports offloading, RPC devices counting as
GPUs; then the load puts no layer on a GPU, which the layer count check refuses.)
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from rbee.errors import BackendUnavailable, InternalError, InvalidModel, InvalidRequest
from rbee.llamacpp import EngineChoice, default_threads, import_llama, loaded_variant
from rbee.protocol.messages import DEFAULT_CTX_TOKENS, Alternative, GenerateParams, TokenProb
from rbee.rpc import add_servers
from rbee.worker.constrained import Constrained
from rbee.worker.template import template_input

LLAMA_LOG_LINES = 20
GGML_LOG_WARN = 3  # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
GGML_LOG_CONT = 5

ALL_LAYERS = -1  # llama-cpp-python's n_gpu_layers for "every layer"
BATCH_TOKENS = 512  # tokens one decode step may hold (llama.cpp's default n_batch and n_ubatch)
MIN_P = 0.05  # llama-cpp-python's default, which rbee's requests do not change
KV_UNIFIED = False  # one KV cache per sequence (see the module docstring)
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")

ProgressFn = Callable[[float], None]

LLAMA_LOG: deque[str] = deque(maxlen=LLAMA_LOG_LINES)  # llama.cpp's latest warnings and errors
_log_state = {"keep": False}
_offloaded = {"layers": 0, "of": 0}  # from llama.cpp's "offloaded N/M layers to GPU" line
_log_callback: Any = None  # the ctypes callback must outlive every call into llama.cpp


class Batch:
    """A ``llama_batch`` over arrays this object owns, filled by slices (no per-token ctypes
    call): one token, position and sequence id per row, and whether llama.cpp keeps its logits.
    Never handed to ``llama_batch_free``: Python frees the arrays."""

    def __init__(self, llama_cpp: Any, capacity: int) -> None:
        self.tokens = (ctypes.c_int32 * capacity)()
        self.positions = (ctypes.c_int32 * capacity)()
        self.seq_ids = (ctypes.c_int32 * capacity)()
        self.logits = (ctypes.c_int8 * capacity)()
        n_seq_id = (ctypes.c_int32 * capacity)(*([1] * capacity))
        int_p = ctypes.POINTER(ctypes.c_int32)
        rows = (int_p * capacity)(
            *(ctypes.cast(ctypes.byref(self.seq_ids, 4 * i), int_p) for i in range(capacity))
        )
        self._keep = (n_seq_id, rows)
        self.struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=ctypes.cast(self.tokens, ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=ctypes.cast(self.positions, ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=n_seq_id,
            seq_id=ctypes.cast(rows, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            logits=self.logits,
        )
        self.size = 0

    def clear(self) -> None:
        """Empty the batch for the next step."""
        self.size = 0

    def add(self, seq: int, tokens: Sequence[int], first_pos: int, logits_last: bool) -> int:
        """Append one sequence's tokens at positions from ``first_pos``; returns the row of the
        last one (where its logits are, when ``logits_last``)."""
        start, end = self.size, self.size + len(tokens)
        self.tokens[start:end] = list(tokens)
        self.positions[start:end] = list(range(first_pos, first_pos + len(tokens)))
        self.seq_ids[start:end] = [seq] * len(tokens)
        self.logits[start:end] = [0] * len(tokens)
        self.logits[end - 1] = 1 if logits_last else 0
        self.size = end
        return end - 1


class Engine:
    """One loaded model with ``slots`` sequences. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        model_path: str,
        n_ctx: int,
        on_progress: ProgressFn,
        backend: str = "cpu",
        main_gpu: int = 0,
        threads: int = 0,
        extra_bufts: bool = True,
        slots: int = 1,
        gpu_layers: int = ALL_LAYERS,
        layers: Sequence[int] = (),
        rpc: Sequence[str] = (),
    ) -> None:
        """Load ``model_path`` with ``slots`` sequences of ``n_ctx`` tokens each (0:
        DEFAULT_CTX_TOKENS) on ``backend``; for ``cuda``, every layer goes to GPU ``main_gpu``.
        ``threads`` 0 means rbee's default; ``extra_bufts`` False loads without llama.cpp's
        repacked weights. ``rpc``: loopback RPC servers (memory another hive lends) holding
        ``gpu_layers`` of a CPU worker's layers, split over them as ``layers`` says."""
        try:
            llama_cpp = import_llama()
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise InvalidModel(f"llama-cpp-python is not importable: {exc}") from None
        self._llama_cpp = llama_cpp
        self.backend = backend
        self.slots = slots
        capture_llama_log(llama_cpp)
        if rpc:
            add_servers(list(rpc))
        placement = gpu_params(llama_cpp, backend, main_gpu, gpu_layers, layers, bool(rpc))
        _offloaded.update(layers=0, of=0)
        self.threads = threads or default_threads()
        with _load_params(llama_cpp, on_progress, extra_bufts, slots):
            try:
                self.llama: Any = _new_llama(
                    llama_cpp,
                    model_path,
                    (n_ctx or DEFAULT_CTX_TOKENS) * slots,
                    self.threads,
                    placement,
                )
            except (ValueError, RuntimeError, OSError) as exc:
                said = "".join(LLAMA_LOG).strip()
                raise InvalidModel(
                    f"llama.cpp could not load {model_path}: {exc}"
                    + (f"\nllama.cpp said:\n{said}" if said else "")
                ) from None
        self.llama._batch.close()  # its own batch (n_batch × n_ctx sequence ids) is never used
        self.template: str = self.llama.metadata.get("tokenizer.chat_template", "")
        offloading = backend == "cuda" or bool(rpc)
        self.gpu_layers = _offloaded["layers"] if offloading else 0
        self.n_layers = _offloaded["of"] if offloading else 0
        wanted = self.n_layers if gpu_layers == ALL_LAYERS else min(gpu_layers, self.n_layers)
        if offloading and self.n_layers and self.gpu_layers < wanted:
            raise BackendUnavailable(
                f"llama.cpp put only {self.gpu_layers} of {self.n_layers} layers on the "
                f"{'GPU' if backend == 'cuda' else 'lent memory'}, not the {wanted} planned"
            )
        self._ctx = self.llama._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = self.llama._model.vocab
        self.batch = Batch(llama_cpp, BATCH_TOKENS)  # filled by the caller, run by ``decode``
        self.batch_tokens = BATCH_TOKENS

    @property
    def n_ctx(self) -> int:
        """Each slot's context, in tokens."""
        return int(self._llama_cpp.llama_n_ctx_seq(self._ctx))

    @property
    def has_chat_template(self) -> bool:
        """Whether prompts are wrapped in the model's chat template unless ``raw``."""
        return bool(self.template)

    @functools.cached_property
    def pieces(self) -> list[bytes]:
        """Every token's bytes, as ``Llama.detokenize([token])`` gives them (read once, ~50 ms
        for a 49k vocabulary): the decode loop looks a token up instead of calling llama.cpp."""
        return [self.llama.detokenize([t]) for t in range(self.llama.n_vocab())]

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most bytes one token of this vocabulary stands for."""
        return max(map(len, self.pieces), default=1) or 1

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of sequence, end of turn …)."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _tokenize(self, text: bytes, add_bos: bool) -> list[int]:
        """Tokens of ``text``; a text that cannot fit the context is refused before the
        tokenizer runs (it needs at least len/longest-token tokens, and tokenizing megabytes
        would hold the worker for seconds)."""
        at_least = len(text) // self.longest_token_bytes
        if at_least > self.n_ctx:
            raise self.too_long(f"at least {at_least}")
        return list(self.llama.tokenize(text, add_bos=add_bos, special=True))

    def too_long(self, count: str) -> InvalidRequest:
        """The error for a prompt of ``count`` tokens that leaves no room to generate."""
        return InvalidRequest(
            f"the prompt has {count} tokens but the context holds {self.n_ctx}",
            suggestion="shorten the prompt or load the model with a larger context",
        )

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        """Tokenize as create_completion (raw) or create_chat_completion (chat) would; a chat is
        ``params.messages`` when given, else one user turn holding the prompt."""
        if params.raw or not self.template:
            if params.tools:
                raise InvalidRequest(
                    "tools need a chat model: this request is raw or the model has no chat template"
                )
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
        result = fmt(**template_input(params, self.template))
        return self._tokenize(result.prompt.encode(), add_bos=not result.added_special)

    def new_sampler(self, params: GenerateParams) -> Any:
        """A sampler chain for one sequence, the one ``Llama.generate()`` builds for these
        settings (its no-op repeat penalty left out): greedy at temperature 0, else top-k,
        typical (off), top-p, min-p, temperature and a seeded draw; with a grammar, that chain
        and the grammar together (rbee.worker.constrained)."""
        lc = self._llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = functools.partial(lc.llama_sampler_chain_add, chain)
        if params.temperature == 0:
            add(lc.llama_sampler_init_greedy())
        else:
            self._add_random(add, params)
        if not params.grammar:
            return chain
        grammar = lc.llama_sampler_init_grammar(self._vocab, params.grammar.encode(), b"root")
        if not grammar:
            lc.llama_sampler_free(chain)
            said = "".join(list(LLAMA_LOG)[-3:]).strip()
            raise InvalidRequest(
                "llama.cpp could not parse the grammar" + (f": {said}" if said else "")
            )
        return Constrained(lc, self._ctx, self.llama.n_vocab(), chain, grammar)

    def _add_random(self, add: Callable[[Any], None], params: GenerateParams) -> None:
        """The chain's samplers for a temperature above 0, ending in a seeded draw."""
        lc = self._llama_cpp
        seed = params.seed if params.seed >= 0 else int.from_bytes(os.urandom(4), "little")
        add(lc.llama_sampler_init_top_k(params.top_k))
        add(lc.llama_sampler_init_typical(1.0, 1))
        add(lc.llama_sampler_init_top_p(params.top_p, 1))
        add(lc.llama_sampler_init_min_p(MIN_P, 1))
        add(lc.llama_sampler_init_temp(params.temperature))
        add(lc.llama_sampler_init_dist(seed))

    def free_sampler(self, sampler: Any) -> None:
        """Free a sampler made by ``new_sampler`` (and every sampler in it)."""
        if isinstance(sampler, Constrained):
            sampler.free()
        else:
            self._llama_cpp.llama_sampler_free(sampler)

    def sample(self, sampler: Any, row: int) -> int:
        """Draw the next token from the logits of batch row ``row``."""
        if isinstance(sampler, Constrained):
            return sampler.sample(row)
        return int(self._llama_cpp.llama_sampler_sample(sampler, self._ctx, row))

    def token_prob(self, row: int, token: int, top: int) -> TokenProb:
        """``token``'s log probability under batch row ``row``'s logits (the model's own
        distribution, as OpenAI reports it, before temperature or top-k), and the ``top``
        likeliest tokens there."""
        logits = np.ctypeslib.as_array(
            self._llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(self.llama.n_vocab(),)
        )
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        best = np.argpartition(-logits, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-logits[best])]
        return TokenProb(
            piece=self.pieces[token],
            logprob=float(logits[token]) - log_total,
            top=[
                Alternative(piece=self.pieces[int(t)], logprob=float(logits[t]) - log_total)
                for t in best
            ],
        )

    def forget(self, seq: int, from_pos: int) -> bool:
        """Drop sequence ``seq``'s cells from ``from_pos`` on; False where llama.cpp cannot cut a
        sequence part way (then the caller drops it whole, from 0, which never fails)."""
        return bool(self._llama_cpp.llama_memory_seq_rm(self._memory, seq, from_pos, -1))

    def decode(self) -> None:
        """Run the batch through the model (the one call per step that does the work)."""
        self._decode(self.batch)

    def _decode(self, batch: Batch) -> None:
        batch.struct.n_tokens = batch.size
        code = self._llama_cpp.llama_decode(self._ctx, batch.struct)
        if code != 0:
            raise InternalError(f"llama.cpp could not decode a batch (llama_decode said {code})")

    # ------------------------------------------------------------------ embeddings

    @functools.cached_property
    def pooled(self) -> bool:
        """Whether the model pools its token vectors itself (an embedding model declares how):
        then an input is read in one decode (rbee.worker.embedding)."""
        lc = self._llama_cpp
        return bool(lc.llama_pooling_type(self._ctx) != lc.LLAMA_POOLING_TYPE_NONE)

    @functools.cached_property
    def n_embd(self) -> int:
        """The length of the model's vectors."""
        return int(self._llama_cpp.llama_model_n_embd(self.llama._model.model))

    @functools.cached_property
    def _embed_batch(self) -> Batch:
        return Batch(self._llama_cpp, BATCH_TOKENS)

    def embedding_tokens(self, text: str, truncate: bool) -> list[int]:
        """An input's tokens, as llama-server reads one (the model's BOS, special tokens
        parsed), cut to what one sequence can read (pooled: one decode) when ``truncate``."""
        limit = self.batch_tokens if self.pooled else self.n_ctx
        tokens = self._tokenize(text.encode(), add_bos=True) if text else []
        if not tokens:
            raise InvalidRequest("an input to embed is empty")
        if len(tokens) > limit:
            if not truncate:
                raise InvalidRequest(
                    f"an input has {len(tokens)} tokens; this model embeds at most {limit}",
                    suggestion="shorten it, or let it be truncated (truncate: true)",
                )
            tokens = tokens[:limit]
        return tokens

    def embed(self, seq: int, tokens: Sequence[int], first_pos: int) -> np.ndarray:
        """Read ``tokens`` into sequence ``seq`` from ``first_pos`` with embeddings on: the
        sum of their vectors (float64), or, for a pooling model, the sequence's pooled
        vector."""
        lc, batch, n = self._llama_cpp, self._embed_batch, self.n_embd
        batch.clear()
        batch.add(seq, tokens, first_pos, True)
        batch.logits[: len(tokens)] = [1] * len(tokens)  # every token's vector
        lc.llama_set_embeddings(self._ctx, True)
        try:
            self._decode(batch)
        finally:
            lc.llama_set_embeddings(self._ctx, False)
        if self.pooled:
            pooled = lc.llama_get_embeddings_seq(self._ctx, seq)
            return np.ctypeslib.as_array(pooled, shape=(n,)).astype(np.float64)
        rows = np.ctypeslib.as_array(lc.llama_get_embeddings(self._ctx), shape=(len(tokens), n))
        summed: np.ndarray = rows.sum(axis=0, dtype=np.float64)
        return summed


def in_process(
    model_path: str, choice: EngineChoice, n_ctx: int = DEFAULT_CTX_TOKENS, logits_all: bool = False
) -> Any:
    """A plain ``llama_cpp.Llama`` loaded exactly as a hive's one-slot worker loads it (threads,
    extra buffer types, CPU variant): the in-process baseline of tests and benchmarks
    (``logits_all``: keep every token's logits, for its log probabilities)."""
    llama_cpp = import_llama()  # the probed variant, unless this process loaded another one
    running = loaded_variant()
    if choice.running and running and running != choice.running:
        raise InvalidModel(
            f"this process runs llama.cpp's {running} CPU variant, workers {choice.running}"
        )
    with _load_params(llama_cpp, lambda _f: None, choice.extra_bufts, slots=1):
        threads = choice.threads or default_threads()
        placement = {"n_gpu_layers": 0, "logits_all": logits_all}
        return _new_llama(llama_cpp, model_path, n_ctx, threads, placement)


def _new_llama(
    llama_cpp: Any, model_path: str, n_ctx: int, threads: int, placement: dict[str, Any]
) -> Any:
    """``Llama()`` as every rbee load makes it (inside ``_load_params``): ``threads`` for
    generation and prompt alike, BATCH_TOKENS a batch, flash attention as llama.cpp decides."""
    return llama_cpp.Llama(
        model_path=model_path,
        n_ctx=n_ctx,
        n_batch=BATCH_TOKENS,
        n_ubatch=BATCH_TOKENS,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,  # "auto" (see _load_params)
        verbose=False,
        **placement,
    )


def gpu_params(
    llama_cpp: Any,
    backend: str,
    main_gpu: int,
    gpu_layers: int = ALL_LAYERS,
    layers: Sequence[int] = (),
    rpc: bool = False,
) -> dict[str, Any]:
    """``Llama()``'s placement arguments for a backend (``gpu_layers`` on the GPUs, split over
    them as ``layers`` says when there are several); refuses CUDA on a CPU-only build. A CPU
    worker with ``rpc`` servers puts ``gpu_layers`` on them (llama.cpp counts RPC devices as
    GPUs and offloads the last layers), the rest on this machine's CPU."""
    if backend == "cpu" and rpc:
        split = {"tensor_split": [float(n) for n in layers]} if len(layers) > 1 else {}
        layer_split = int(llama_cpp.LLAMA_SPLIT_MODE_LAYER)
        return {"n_gpu_layers": gpu_layers, "main_gpu": 0, "split_mode": layer_split, **split}
    if backend == "cpu":
        return {"n_gpu_layers": 0}
    if backend != "cuda":
        raise BackendUnavailable(f"a worker cannot run on the {backend} backend")
    if not llama_cpp.llama_supports_gpu_offload():
        raise BackendUnavailable(
            "this llama.cpp build has no GPU support, so it cannot run a model on CUDA",
            suggestion="install the CUDA build of llama-cpp-python (packaging/cuda/build.sh)",
        )
    if len(layers) > 1:  # the devices this process sees, in the order CUDA_VISIBLE_DEVICES gave
        return {
            "n_gpu_layers": gpu_layers,
            "main_gpu": 0,
            "split_mode": int(llama_cpp.LLAMA_SPLIT_MODE_LAYER),
            "tensor_split": [float(n) for n in layers],
        }
    return {
        "n_gpu_layers": gpu_layers,
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
def _load_params(
    llama_cpp: Any, on_progress: ProgressFn, extra_bufts: bool, slots: int
) -> Iterator[None]:
    """Hook llama.cpp's model-loading progress callback, set whether it may use extra buffer
    types, give the context ``slots`` sequences, and let llama.cpp decide on flash attention,
    for the duration of one load.

    llama-cpp-python builds its parameters inside ``Llama.__init__`` and offers no parameter for
    the first three, so the default-params factories are wrapped while loading. For flash attention
    it offers on or off, where llama.cpp's own default (llama-server's) is "auto": on wherever
    the device supports it for the model (on this project's CPUs 7-13 % more tokens/s for the
    default model). ``Llama(flash_attn=True)`` reads the "enabled" constant from the module, so
    that constant says "auto" while loading.
    """
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params
    original_context = module.llama_context_default_params
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

    def context_with_slots() -> Any:
        params = original_context()
        params.n_seq_max = slots
        params.kv_unified = KV_UNIFIED
        return params

    module.llama_model_default_params = params_with_progress
    module.llama_context_default_params = context_with_slots
    module.LLAMA_FLASH_ATTN_TYPE_ENABLED = module.LLAMA_FLASH_ATTN_TYPE_AUTO
    try:
        yield
    finally:
        module.llama_model_default_params = original
        module.llama_context_default_params = original_context
        module.LLAMA_FLASH_ATTN_TYPE_ENABLED = enabled
