"""18: many streams on one loaded model, `rbee serve` against llama.cpp's own llama-server.

K = 1, 4, 8, 16 concurrent streams (``--ks``) through each server, driven by the same client
code over HTTP: one thread per stream, each POSTing /v1/completions with ``stream: true``, a raw
prompt of its own (a distinct short text, tagged with the run, the repetition and the stream so
no two requests share more than a few leading tokens and llama-server's prompt cache cannot serve
a repeated prompt), greedy (temperature 0), ``max_tokens`` ``--tokens`` (64) and ``ignore_eos``
(both servers accept it: llama-server's completion schema, rbee's rbee/gateway/params.py), so
every stream generates exactly the tokens asked for. The threads start together on a barrier.
Before the measured runs each server answers one warm-up request (rbee's loads its worker).
Repetitions (``--reps``, 3) are interleaved: for each repetition, for each K, llama-server then
rbee; the table shows medians over the repetitions and the spread of the figure.

Per K and side, from ``time.perf_counter()`` in the client threads:

- aggregate tokens/s: all streams' tokens ÷ (the last stream's end − the first request sent);
- first token p50 / p99: request sent → first SSE event carrying text, over the K streams of a
  repetition (p99 interpolated between ranks: at K ≤ 16 it is close to the slowest stream);
- per-stream tokens/s: (tokens − 1) ÷ (last text event − first text event) of each stream, the
  median over the K streams (a queued stream's wait shows in its first token, not here);
- peak RSS of the serving processes, sampled every 100 ms while the K streams run: llama-server's
  process; rbee's hive plus all its descendants (the workers). `rbee serve` (the HTTP gateway) is
  recorded separately in the JSON, not in the figure; on a GPU, the peak GPU memory NVML reports
  for the same processes (blank where NVML is missing or does not list them).

`rbee serve` is pinned to the benchmark's hive (``--node``), as llama-server is one server: the
figures are the batching's, not a LAN survey's. At the end, a consistency pass: 8 prompts run one
at a time, then all at once, on each server, the whole prompt computed every time
(``cache_prompt`` false); how many texts batching left the same goes to the JSON and the output.

Tokens are counted as the server's own count where it gives one: both send ``usage`` (asked for with
``stream_options.include_usage``; llama-server's text-completion stream carries it on its last chunk
anyway) with ``completion_tokens``, the tokens the model generated. Where ``usage`` is missing, the
count is the number of SSE events carrying text: llama-server sends one per generated token (fewer
only when it holds back an incomplete UTF-8 sequence), rbee's gateway one per Token frame of its
worker, which carries the tokens made within the hive's stream interval (``--stream-interval-ms``,
25 by default; the environment's ``RBEE_STREAM_INTERVAL_MS`` reaches the benchmark's hive, so
``RBEE_STREAM_INTERVAL_MS=0`` measures one event per token). Both counts go to the JSON; a stream
that produced fewer tokens than asked for is reported in the table.

The peer is llama-server built from the very llama.cpp source llama-cpp-python vendors, with
rbee's engine flags and CPU variants (bench/build_llama_server.sh: built once, cached in
~/.cache/rbee-build; needs cmake and ninja, e.g. ``pip install cmake ninja`` in the venv), running
the hive's engine probe verdict: the same CPU variant (a copy beside just that variant's library,
as bench/peers.py does), ``--no-repack`` where the probe turned extra buffer types off, and the
same threads (``-t``/``-tb`` for llama-server, ``--threads`` for the hive: this script's
``--threads``, by default the probe's count).

Slots and context. llama-server runs ``--parallel P -c P×C --no-kv-unified``, C being rbee's
per-slot context (a worker's context: min(the model's training context, 4096), as the hive's
provisioner sets it: rbee/hive/provision.py), P the largest K unless ``--parallel`` says. In the
llama.cpp that llama-cpp-python 0.3.36 vendors, ``-c`` is the TOTAL KV cache: without a unified
cache each of the ``n_seq_max = P`` sequences gets its own KV stream of ``n_ctx / n_seq_max``
cells, padded to 256 (src/llama-context.cpp, ``cparams.n_ctx_seq = cparams.n_ctx /
cparams.n_seq_max``), so every slot holds exactly C tokens; with a unified cache all slots share
one pool of ``-c`` cells and one slot may fill it (``n_ctx_seq = n_ctx``; the server still caps a
slot at the training context). An explicit ``--parallel`` leaves the cache split: ``kv_unified``
defaults to false (common/common.h) and only the automatic slot count (``-np -1``, the server's
default) turns it on (tools/server/server.cpp). The script passes ``--no-kv-unified`` anyway
(``--kv-unified`` unifies llama-server's instead; rbee's worker lays out its own). The hive gets
``--parallel P`` (slots per worker, each of context C; ``--rbee-parallel N`` gives it another
count, 0 its automatic one) when `rbee hive --help` lists that flag; otherwise the run says so
and rbee runs as it is: one worker per model, one job at a time, the others queued (the hive's
``--max-queue`` is 16, so K ≤ 17).

While one server streams, the other is idle; the CPU time it takes meanwhile and the load
average before each run go to the JSON (a warning is printed above 5 % of the run's wall time):
on a small shared machine other work spoils the figures (ggml's OpenMP threads spin-wait).

``--llama-server PATH`` runs that build instead of building one (no CPU-variant copy is made;
``--no-repack`` still follows the probe on the CPU). GPU (``--backend cuda`` or ``--gpu``):
llama-server gets ``-ngl 99`` (and no ``--no-repack``); give it a CUDA build with
``--llama-server PATH``. rbee's gateway asks its hive for a CPU worker on every request
(rbee/gateway/app.py builds ``InferRequest`` with its default backend "cpu"); the run passes
``--backend cuda`` to `rbee serve` where its help lists that flag, and stops otherwise rather
than compare CUDA against CPU.

    python bench/batching.py [--ks 1,4,8,16] [--reps 3] [--tokens 64] [--parallel P]
        [--rbee-parallel N] [--model PATH] [--threads N] [--llama-server PATH]
        [--backend cpu|cuda | --gpu] [--kv-unified] [--timeout S] [--json PATH]

The table is printed; bench/results/batching-<time>.json holds every stream of every run, the
rows (medians, spreads, every repetition) and the table in Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    RBEE,
    Row,
    Server,
    default_model,
    free_port,
    machine,
    markdown,
    median,
    percentile,
    running_hive,
    serving,
    table,
)
from peers import only_variant

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the bundled model's catalog name
CONSISTENCY_STREAMS = 8  # prompts run alone and then together, on both servers
TEXTS = (
    "The old lighthouse keeper climbed the stairs",
    "In the kitchen, the bread was slowly rising",
    "A short history of the bicycle begins",
    "The river froze early that winter, and",
    "Photosynthesis turns sunlight into",
    "The recipe for tomato soup calls for",
    "On the first day of school, Maria",
    "The train to the coast was late again because",
    "Volcanoes form where tectonic plates",
    "My grandfather kept a small garden of",
    "The museum's newest exhibit shows",
    "Rain fell on the tin roof while",
    "Chess players often open with",
    "The spacecraft drifted past the moon and",
    "Honeybees tell each other where flowers are by",
    "The library closes at nine, so",
)
SAMPLE_S = 0.1  # memory sampling period
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 300  # between two reads of one stream (rbee's gateway sends keep-alives)


# ------------------------------------------------------------------ one stream, K streams


@dataclass
class Stream:
    """One streamed completion as the client saw it (perf_counter seconds)."""

    sent: float
    first: float = float("nan")  # first event carrying text
    last: float = float("nan")  # last event carrying text
    end: float = float("nan")  # [DONE] (or the response's end)
    events: int = 0  # SSE events carrying text
    usage: int | None = None  # the server's completion_tokens
    finish: str | None = None
    chars: int = 0
    text: str = ""

    @property
    def tokens(self) -> int:
        """The server's count where it gave one, else the text events."""
        return self.usage if self.usage is not None else self.events

    @property
    def ttft_ms(self) -> float:
        """Request sent → first text."""
        return (self.first - self.sent) * 1000

    @property
    def tokens_per_s(self) -> float:
        """Tokens after the first ÷ the time they took."""
        span = self.last - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def body(model: str, prompt: str, tokens: int, cache_prompt: bool = True) -> dict[str, Any]:
    """The request both servers get (``cache_prompt`` false: the whole prompt is computed even
    where a slot holds its prefix; both servers accept it)."""
    return {
        "cache_prompt": cache_prompt,
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def one_stream(client: Any, base: str, request: dict[str, Any], go: threading.Barrier) -> Stream:
    """Wait for the others, then stream one completion, stamping every text event."""
    go.wait()
    s = Stream(time.perf_counter())
    with client.stream("POST", f"{base}/v1/completions", json=request) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{base}: HTTP {response.status_code}: {response.text[:500]}")
        for line in response.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: "):
                continue  # blank lines, keep-alive comments
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{base}: error event: {json.dumps(event)[:500]}")
            for choice in event.get("choices") or []:
                if text := choice.get("text"):
                    if not s.events:
                        s.first = now
                    s.last = now
                    s.events += 1
                    s.chars += len(text)
                    s.text += text
                s.finish = choice.get("finish_reason") or s.finish
            if usage := event.get("usage"):
                s.usage = int(usage["completion_tokens"])
    s.end = time.perf_counter()
    if not s.events:
        raise RuntimeError(f"{base}: no text (finish_reason {s.finish})")
    return s


def streams(
    base: str,
    model: str,
    prompts: Sequence[str],
    tokens: int,
    timeout: float,
    cache_prompt: bool = True,
) -> list[Stream]:
    """K = len(prompts) streams at once, one thread and one connection each."""
    import httpx

    k = len(prompts)
    go = threading.Barrier(k)
    done: list[Stream | None] = [None] * k
    failed: list[BaseException] = []
    timeouts = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    clients = [httpx.Client(timeout=timeouts) for _ in prompts]

    def run(i: int) -> None:
        try:
            request = body(model, prompts[i], tokens, cache_prompt)
            done[i] = one_stream(clients[i], base, request, go)
        except BaseException as exc:
            failed.append(exc)
            go.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(k)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise SystemExit(f"{base}: {k} streams did not finish within {timeout:.0f} s")
    finally:
        for c in clients:
            c.close()
    real = [e for e in failed if not isinstance(e, threading.BrokenBarrierError)]
    if real or failed:
        raise SystemExit(f"{base}: {k} streams failed: {(real or failed)[0]}")
    return [s for s in done if s is not None]


def prompts(k: int, tag: str) -> list[str]:
    """K distinct raw prompts; ``tag`` makes them differ from every other run's from the start."""
    return [f"[{tag}.{i}] {TEXTS[i % len(TEXTS)]}" for i in range(k)]


# ------------------------------------------------------------------ memory


class Memory:
    """Peak RSS (and GPU memory) of a set of processes, sampled in a thread while in use."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.rss = 0
        self.vram: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Memory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def _sample(self) -> None:
        import psutil

        pids = self.pids()
        rss = 0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                rss += psutil.Process(pid).memory_info().rss
        self.rss = max(self.rss, rss)
        vram = gpu_memory(set(pids))
        if vram is not None:
            self.vram = max(self.vram or 0, vram)


@contextlib.contextmanager
def nvml() -> Iterator[list[Any]]:
    """NVML's device handles for the run ([] where there is no NVML or no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: no GPU figures
        pynvml = None
    if pynvml is None:
        yield []
        return
    try:
        _GPUS[:] = [
            pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
        ]
        yield _GPUS
    finally:
        _GPUS.clear()
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


_GPUS: list[Any] = []


def gpu_memory(pids: set[int]) -> int | None:
    """GPU memory NVML says these processes use (None: no GPU, or it lists none of them)."""
    if not _GPUS:
        return None
    import pynvml

    used, seen = 0, False
    for handle in _GPUS:
        with contextlib.suppress(pynvml.NVMLError):
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid in pids and p.usedGpuMemory is not None:
                    used += int(p.usedGpuMemory)
                    seen = True
    return used if seen else None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def descendants(pid: int) -> list[int]:
    """A process and every process below it."""
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


# ------------------------------------------------------------------ the servers


def build_llama_server() -> Path:
    """bench/build_llama_server.sh (built once, cached): the path of llama-server."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,  # engine.sh's wheel is this interpreter's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    print("[build] llama-server (bench/build_llama_server.sh; minutes the first time)", flush=True)
    built = subprocess.run(
        [str(BENCH / "build_llama_server.sh")], env=env, capture_output=True, text=True
    )
    if built.returncode != 0:
        missing = [t for t in ("cmake", "ninja") if shutil.which(t, path=env["PATH"]) is None]
        hint = (
            f" ({', '.join(missing)} missing: pip install {' '.join(missing)})" if missing else ""
        )
        raise SystemExit(f"building llama-server failed{hint}:\n{built.stderr[-3000:]}")
    return Path(built.stdout.split()[-1])


def has_flag(argv: list[str], flag: str) -> bool:
    """Whether ``argv --help`` lists ``flag``."""
    helped = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    return any(word.strip(",[]") == flag for word in helped.stdout.split())


def slot_context(model: str) -> int:
    """rbee's per-slot context for this model: min(its training context, 4096), as the hive's
    provisioner gives a worker (rbee/hive/provision.py)."""
    from rbee.gguf import read_gguf_info
    from rbee.protocol.messages import DEFAULT_CTX_TOKENS

    trained = read_gguf_info(model).context_length
    return min(trained or DEFAULT_CTX_TOKENS, DEFAULT_CTX_TOKENS)


# ------------------------------------------------------------------ the benchmark


@dataclass
class Config:
    """What one run measures, from the command line."""

    ks: list[int]
    reps: int = 3
    tokens: int = 64
    slots: int = 0  # 0: the largest K
    rbee_slots: int | None = None  # the hive's --parallel; None: as llama-server's
    model: str = ""  # a GGUF path; "": the bundled default model
    threads: int = 0  # 0: the engine probe's
    llama_server: str = ""  # a prebuilt llama-server; "": build one
    backend: str = "cpu"
    kv_unified: bool = False
    timeout: float = 600  # seconds for one run of K streams
    hive_log: Path | None = None  # where to keep the hive's log


@dataclass
class Side:
    """One K of one server in one repetition."""

    streams: list[Stream]
    rss: int
    vram: int | None
    gateway_rss: int = 0
    idle_cpu_s: float = 0.0  # CPU time the other server's processes took meanwhile
    load: float = 0.0  # the 1-minute load average before the run

    @property
    def aggregate(self) -> float:
        """All tokens ÷ first request sent → last stream done."""
        wall = max(s.end for s in self.streams) - min(s.sent for s in self.streams)
        return sum(s.tokens for s in self.streams) / wall

    def ttft(self, q: float) -> float:
        """The q-th percentile of the streams' first-token latencies (ms)."""
        return percentile([s.ttft_ms for s in self.streams], q)

    @property
    def per_stream(self) -> float:
        """The median stream's tokens/s after its first token."""
        return median([s.tokens_per_s for s in self.streams])

    def to_json(self) -> dict[str, Any]:
        """Every stream, relative to the first request sent."""
        t0 = min(s.sent for s in self.streams)
        return {
            "aggregate_tokens_per_s": self.aggregate,
            "ttft_ms_p50": self.ttft(50),
            "ttft_ms_p99": self.ttft(99),
            "per_stream_tokens_per_s_median": self.per_stream,
            "rss_bytes": self.rss,
            "vram_bytes": self.vram,
            "gateway_rss_bytes": self.gateway_rss or None,
            "other_server_cpu_s": self.idle_cpu_s,
            "load_average_before": self.load,
            "streams": [
                {
                    **{
                        k: v
                        for k, v in asdict(s).items()
                        if k not in ("sent", "first", "last", "end")
                    },
                    "sent_s": s.sent - t0,
                    "ttft_ms": s.ttft_ms,
                    "last_text_s": s.last - t0,
                    "end_s": s.end - t0,
                    "tokens": s.tokens,
                    "tokens_per_s": s.tokens_per_s,
                }
                for s in self.streams
            ],
        }


def measure(
    server: Server,
    model: str,
    k: int,
    tag: str,
    config: Config,
    pids: Callable[[], list[int]],
    others: Callable[[], list[int]],
) -> Side:
    """K streams through one server, its memory sampled meanwhile, and the CPU time the other
    server (idle, and meant to stay so) took."""
    load = os.getloadavg()[0]
    before = cpu_seconds(others())
    with Memory(pids) as memory:
        got = streams(server.base, model, prompts(k, tag), config.tokens, config.timeout)
    idle = cpu_seconds(others()) - before
    side = Side(got, memory.rss, memory.vram, idle_cpu_s=idle, load=load)
    wall = max(s.end for s in got) - min(s.sent for s in got)
    if idle > 0.05 * wall:
        print(f"[warning] the idle server took {idle:.2f} CPU s during a {wall:.2f} s run")
    return side


def run(config: Config) -> tuple[list[Row], dict[str, Any]]:
    """Start both servers, warm them, then the interleaved repetitions; the rows and raw data."""
    from rbee.hive.probe import for_model

    if config.backend == "cuda" and not has_flag([*RBEE, "serve"], "--backend"):
        raise SystemExit(
            "--backend cuda: `rbee serve` cannot ask for CUDA workers (its gateway requests the"
            " cpu backend on every request: rbee/gateway/app.py), so rbee would run on the CPU"
            " against llama-server on the GPU; not measured"
        )
    model = config.model or str(default_model())
    rbee_model = f"file:{Path(model).resolve()}" if config.model else DEFAULT_MODEL
    slots = config.slots or max(config.ks)
    ctx = slot_context(model)
    choice = for_model(model, config.threads)
    threads = config.threads or choice.threads
    # llama-server
    server = Path(config.llama_server) if config.llama_server else build_llama_server()
    if not config.llama_server and choice.variant and config.backend == "cpu":
        server = only_variant(server, choice.variant)
    peer_port, gateway_port = free_port(), free_port()
    peer_argv = [str(server), "-m", model, "--parallel", str(slots), "-c", str(slots * ctx)]
    peer_argv += ["--kv-unified" if config.kv_unified else "--no-kv-unified"]
    peer_argv += ["-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1"]
    peer_argv += ["--port", str(peer_port)]
    if config.backend == "cuda":
        peer_argv += ["-ngl", "99"]
    elif not choice.extra_bufts:
        peer_argv.append("--no-repack")
    # rbee
    hive_args = ["--threads", str(threads)]
    rbee_slots = slots if config.rbee_slots is None else config.rbee_slots
    if has_flag([*RBEE, "hive"], "--parallel"):
        hive_args += ["--parallel", str(rbee_slots)]
        mode = f"batched: rbee hive --parallel {rbee_slots} (each slot a {ctx}-token context)"
    else:
        mode = (
            "unbatched: this rbee hive has no --parallel; one worker per model runs one job at a"
            " time, the others queue"
        )
    gateway_argv = [*RBEE, "serve", "--listen", f"127.0.0.1:{gateway_port}"]
    if config.backend == "cuda":
        gateway_argv += ["--backend", "cuda"]
    about = {
        "mode": mode,
        "model": model,
        "rbee_model": rbee_model,
        "slots": slots,
        "rbee_slots": rbee_slots if "--parallel" in hive_args else None,
        "slot_context": ctx,
        "kv_unified": config.kv_unified,
        "threads": threads,
        "backend": config.backend,
        "engine": choice.describe(),
        "llama_server_argv": peer_argv,
        "hive_args": hive_args,
        "gateway_argv": gateway_argv[len(RBEE) :],
    }
    print(f"[mode] {mode}", flush=True)
    print(f"[peer] {' '.join(peer_argv)}", flush=True)
    print(f"[rbee] rbee hive {' '.join(hive_args)}; rbee serve; engine: {choice.describe()}")
    raw: dict[int, dict[str, list[Side]]] = {k: {"peer": [], "rbee": []} for k in config.ks}
    run_id = f"{os.getpid() % 1000}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        nvml(),
        running_hive(tmp, *hive_args) as hive,
        serving(peer_argv, None, peer_port, "/v1/models") as peer,
        serving(
            pinned(gateway_argv, hive.env),
            hive.env,
            gateway_port,
            "/health",
            config.hive_log.with_suffix(".gateway.log") if config.hive_log else None,
        ) as gateway,
    ):

        def rbee_pids() -> list[int]:
            return descendants(hive.proc.pid)

        def peer_pids() -> list[int]:
            return [peer.proc.pid]

        print("[warm-up] one request each (rbee loads its worker)", flush=True)
        for srv, name in ((peer, "peer"), (gateway, rbee_model)):
            streams(srv.base, name, prompts(1, f"w{run_id}"), config.tokens, config.timeout)
        for rep in range(config.reps):
            for k in config.ks:
                tag = f"{run_id}.{rep}.{k}"
                p = measure(peer, "peer", k, tag, config, peer_pids, rbee_pids)
                with Memory(lambda: [gateway.proc.pid]) as gw:
                    r = measure(gateway, rbee_model, k, tag, config, rbee_pids, peer_pids)
                r.gateway_rss = gw.rss
                raw[k]["peer"].append(p)
                raw[k]["rbee"].append(r)
                print(
                    f"[rep {rep + 1}/{config.reps}] K={k}: aggregate {r.aggregate:.1f} vs"
                    f" {p.aggregate:.1f} tok/s, first token p50 {r.ttft(50):.0f} vs"
                    f" {p.ttft(50):.0f} ms (rbee vs llama-server)",
                    flush=True,
                )
        k = min(CONSISTENCY_STREAMS, slots, rbee_slots or slots)
        about["consistency"] = {
            "streams": k,
            "peer": consistency(peer.base, "peer", k, run_id, config),
            "rbee": consistency(gateway.base, rbee_model, k, run_id, config),
        }
        print(f"[consistency] {about['consistency']}", flush=True)
        if config.hive_log is not None:  # each job's dispatch and worker-side first token
            shutil.copyfile(hive.log, config.hive_log)
    rows = rows_of(raw, config)
    about["runs"] = {
        str(k): {side: [s.to_json() for s in sides] for side, sides in by_side.items()}
        for k, by_side in raw.items()
    }
    return rows, about


def pinned(gateway_argv: list[str], hive_env: dict[str, str]) -> list[str]:
    """`rbee serve` sending every request to the benchmark's hive (``--node``), as llama-server
    is one server: the figures are the batching's, not a LAN survey's."""
    return [*gateway_argv, "--node", f"127.0.0.1:{hive_env['RBEE_HIVE_PORT']}"]


def consistency(base: str, model: str, k: int, run_id: str, config: Config) -> dict[str, Any]:
    """How often batching changes greedy text: K prompts run one at a time, then all K at once,
    the whole prompt computed every time (``cache_prompt`` false on both servers); how many of
    the K texts are the same, and after how many characters the others part."""
    texts = prompts(k, f"c{run_id}")
    alone = [
        streams(base, model, [p], config.tokens, config.timeout, cache_prompt=False)[0].text
        for p in texts
    ]
    together = [s.text for s in streams(base, model, texts, config.tokens, config.timeout, False)]
    parted = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(alone, together, strict=True)
        if a != b
    ]
    return {"same": sum(a == b for a, b in zip(alone, together, strict=True)), "parted_at": parted}


def figure_row(
    k: int,
    rbee: list[Side],
    peer: list[Side],
    name: str,
    get: Callable[[Side], float],
    ratio: bool = True,
    **kw: Any,
) -> Row:
    """One measure at one K: rbee ÷ llama-server (or, not ``ratio``, rbee − llama-server) per
    repetition."""
    mine, theirs = [get(s) for s in rbee], [get(s) for s in peer]
    figure = [
        (a / b if b else float("nan")) if ratio else a - b
        for a, b in zip(mine, theirs, strict=True)
    ]
    op = "÷" if ratio else "−"
    name = f"batching K={k}: {name}, rbee {op} llama-server"
    return Row("18", name, figure, rbee=mine, baseline=theirs, **kw)


def rows_of(raw: dict[int, dict[str, list[Side]]], config: Config) -> list[Row]:
    """Per K: aggregate, first token p50 and p99, per-stream tokens/s, RSS (and GPU memory)."""
    rows = []
    for k, sides in raw.items():
        peer, rbee = sides["peer"], sides["rbee"]
        row = functools.partial(figure_row, k, rbee, peer)
        short = [
            f"{side} {min(s.tokens for r in runs for s in r.streams)}"
            for side, runs in (("rbee", rbee), ("llama-server", peer))
        ]
        tokens_note = ""
        if any(s.tokens < config.tokens for runs in (rbee, peer) for r in runs for s in r.streams):
            tokens_note = f"fewest tokens in a stream: {', '.join(short)} (asked {config.tokens})"
        rows.append(
            row(
                "aggregate tokens/s",
                lambda s: s.aggregate,
                op="≥",
                target=0.9,
                digits=3,
                note=tokens_note,
            )
        )
        rows.append(
            row(
                "first token p50",
                lambda s: s.ttft(50),
                ratio=False,
                unit="ms",
                **({"op": "≤", "target": 10} if k == 8 else {}),
            )
        )
        rows.append(row("first token p99", lambda s: s.ttft(99), ratio=False, unit="ms"))
        rows.append(
            row(
                "per-stream tokens/s (median)",
                lambda s: s.per_stream,
                digits=3,
                **({"op": "≥", "target": 0.95} if k == 1 else {}),
            )
        )
        rows.append(
            row(
                "peak RSS (MB)",
                lambda s: s.rss / 1e6,
                digits=2,
                note="rbee: hive + workers; llama-server: its process" if k == min(raw) else "",
            )
        )
        if all(s.vram is not None for s in (*rbee, *peer)):
            rows.append(row("peak GPU memory (MB)", lambda s: (s.vram or 0) / 1e6, digits=2))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,4,8,16", help="concurrent streams, comma list")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--parallel", type=int, default=0, help="slots (default: largest K)")
    parser.add_argument(
        "--rbee-parallel",
        type=int,
        help="the hive's --parallel if not --parallel's (0: the hive's automatic choice)",
    )
    parser.add_argument("--model", default="", help="a GGUF file (default: the bundled model)")
    parser.add_argument("--threads", type=int, default=0, help="default: the engine probe's")
    parser.add_argument("--llama-server", default="", help="a built llama-server (skip the build)")
    parser.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--gpu", action="store_true", help="same as --backend cuda")
    parser.add_argument("--kv-unified", action="store_true", help="llama-server's unified KV")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run of K streams")
    parser.add_argument("--json", type=Path, help="default: bench/results/batching-<time>.json")
    parser.add_argument(
        "--hive-log", type=Path, help="keep the hive's log here (the gateway's beside it)"
    )
    args = parser.parse_args()
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        parser.error(f"--ks {args.ks!r} is not a comma list of integers")
    if min(ks) < 1 or args.reps < 1 or args.tokens < 2:
        parser.error("K and --reps must be ≥ 1, --tokens ≥ 2")
    if args.model and not Path(args.model).is_file():
        parser.error(f"--model {args.model}: no such file")
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        parser.error(f"--llama-server {args.llama_server}: not an executable file")
    config = Config(
        ks=ks,
        reps=args.reps,
        tokens=args.tokens,
        slots=args.parallel,
        rbee_slots=args.rbee_parallel,
        model=args.model,
        threads=args.threads,
        llama_server=args.llama_server,
        backend="cuda" if args.gpu else args.backend,
        kv_unified=args.kv_unified,
        timeout=args.timeout,
        hive_log=args.hive_log,
    )
    os.environ.setdefault("RBEE_MDNS_INTERFACES", "127.0.0.1")
    about = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in about.items()), flush=True)
    started = time.monotonic()
    rows, details = run(config)
    about["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print(f"mode: {details['mode']}")
    print(table(rows))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    path = args.json or RESULTS / f"batching-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": about,
        "config": asdict(config),
        "rows": [r.to_json() for r in rows],
        "markdown": markdown(rows),
        **details,
    }
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
