"""A hive's Prometheus metrics: what it counts, kept in a registry of its own.

Each hive keeps its metrics in its own ``CollectorRegistry``, never the library's global one
(tests run several hives in one process). Every series carries the hive's ``node`` label, those
about a model its ``model`` (the catalog name) and those about a worker its ``worker``. Counters
and histograms about jobs carry no ``worker`` label: worker ids are new at every spawn, and a
counter's series live as long as the hive.

Where each fact is learned:

* jobs (``rbee_jobs_total{outcome, code}``), tokens, time to first token, inter-token time: the
  job desk (rbee.hive.jobs) at a job's one terminal frame (Done carries the totals and timings
  the worker measured), or when a queued job is ended; a StartJob refused before it is queued
  (ALL_SLOTS_BUSY, MODEL_NOT_FOUND …) is counted by the hive's loop, with ``model=""`` (what a
  refused request names is not a catalog model, and a label must not grow with what keepers
  send). ``outcome`` is ``done``, ``canceled`` (its keeper canceled it: ``code="CANCELED"``; the
  hive or an admin stopped it: ``code="JOB_STOPPED"``) or ``error`` (``code`` says which).
* inter-token time: one observation per job, its mean gap ``decode_s / (tokens - 1)`` from the
  Done frame, not one per Token frame: the relay of each token does no extra work for metrics.
  A histogram of per-job means is narrower than one of single gaps.
* model load time: a worker's WorkerReady (its ``load_s``).
* download bytes: the transfer's progress reports on the pull's thread (counter updates are
  thread-safe); a resumed file's bytes already on disk are not counted again, except those of
  a resumed later part of a split model. Failures: a pull that ends with an error other than
  CANCELED, labelled by its code.
* queue depth, slots busy and total, memory estimated and measured per worker: gauges of the
  present, published by the loop as an immutable snapshot (``refresh``) at most every
  METRICS_REFRESH_S and right before a Metrics frame is answered, and turned into samples when
  the registry is read. The loopback metrics server reads it from its own thread, so it may be
  up to METRICS_REFRESH_S old there. A worker's measured RAM is its RSS at that read; its
  measured VRAM what it held on its GPUs once loaded; its estimate is what placement expected
  on its device (the GPU part for a GPU worker, RAM for a CPU worker).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rbee.errors import InvalidRequest
from rbee.gpu import process_rss_bytes
from rbee.hive.registry import WorkerRecord
from rbee.protocol.messages import Done
from rbee.transport.sockets import cannot_listen, is_loopback

METRICS_REFRESH_S = 1.0  # how stale the gauges of the present may be for a loopback scrape
METRICS_SERVER_STOP_S = 5.0
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
LOAD_BUCKETS_S = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STOPPED_CODES = ("CANCELED", "JOB_STOPPED")  # a job ended on purpose: outcome "canceled"
METRICS_HOST = "127.0.0.1"


def metrics_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` of `rbee hive --metrics-port` → host and port
    (port 0: off); InvalidRequest for anything but a loopback address: the metrics server has
    no authentication, so it never listens where the LAN reaches it."""
    host, _, port_text = text.strip().rpartition(":")
    host = host.strip("[]") or METRICS_HOST
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise InvalidRequest(
            f"--metrics-port takes PORT or 127.0.0.1:PORT (got {text!r})",
            suggestion="e.g. --metrics-port 9464",
        )
    require_loopback(host)
    return host, port


def require_loopback(host: str) -> None:
    """InvalidRequest unless ``host`` is a loopback address: the metrics server has no keys."""
    if not is_loopback(host):
        raise InvalidRequest(
            f"--metrics-port listens on loopback only, not on {host}: the metrics server has no "
            "keys, and nothing unauthenticated listens on the LAN",
            suggestion="run Prometheus' agent on this machine, or scrape `rbee serve`'s /metrics",
        )


@dataclass(frozen=True)
class WorkerSample:
    """What the gauges say of one worker, copied on the loop thread."""

    worker_id: str
    model: str
    pid: int
    backend: str
    slots: int
    busy: int
    estimate_bytes: int
    vram_bytes: int

    @classmethod
    def of(cls, worker: WorkerRecord) -> WorkerSample:
        """The sample of ``worker`` now."""
        return cls(
            worker.worker_id,
            worker.model,
            worker.pid,
            worker.backend,
            worker.slots,
            len(worker.job_ids),
            worker.estimate_bytes,
            worker.vram_bytes,
        )


@dataclass(frozen=True)
class Snapshot:
    """The present as the loop last published it."""

    queue: int = 0
    workers: tuple[WorkerSample, ...] = ()


class _Present(Collector):
    """The gauges of the present, read from the latest snapshot whenever the registry is."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.snapshot = Snapshot()  # replaced whole by the loop; read by any thread

    def collect(self) -> Iterable[Metric]:
        snap, node = self.snapshot, self.node
        queue = GaugeMetricFamily(
            "rbee_queue_depth", "Jobs waiting for a free slot", labels=["node"]
        )
        queue.add_metric([node], snap.queue)
        labels = ["node", "model", "worker"]
        slots = GaugeMetricFamily("rbee_worker_slots", "Slots of a worker", labels=labels)
        busy = GaugeMetricFamily(
            "rbee_worker_slots_busy", "Slots of a worker running a job", labels=labels
        )
        memory = [*labels, "memory"]
        estimated = GaugeMetricFamily(
            "rbee_worker_memory_estimated_bytes",
            "Memory placement expected the worker to need on its device (memory: ram or vram)",
            labels=memory,
        )
        measured = GaugeMetricFamily(
            "rbee_worker_memory_measured_bytes",
            "Memory the worker holds (ram: its RSS now; vram: on its GPUs once loaded)",
            labels=memory,
        )
        for w in snap.workers:
            at = [node, w.model, w.worker_id]
            slots.add_metric(at, w.slots)
            busy.add_metric(at, w.busy)
            device = "vram" if w.backend == "cuda" else "ram"
            if w.estimate_bytes:
                estimated.add_metric([*at, device], w.estimate_bytes)
            rss = process_rss_bytes(w.pid)
            if rss:
                measured.add_metric([*at, "ram"], rss)
            if w.backend == "cuda" and w.vram_bytes:
                measured.add_metric([*at, "vram"], w.vram_bytes)
        yield from (queue, slots, busy, estimated, measured)


class HiveMetrics:
    """One hive's metrics: the loop records facts as they happen (``job_done``,
    ``job_failed``, ``worker_loaded``, ``refresh``), pull threads their bytes; ``text`` is the
    Prometheus text exposition of them all."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        per_model = ["node", "model"]
        reg = self.registry
        self.jobs = Counter(
            "rbee_jobs",
            "Jobs ended, by outcome (done, canceled, error) and error code",
            [*per_model, "outcome", "code"],
            registry=reg,
        )
        self.tokens = Counter(
            "rbee_generated_tokens", "Tokens generated by finished jobs", per_model, registry=reg
        )
        self.prompt_tokens = Counter(
            "rbee_prompt_tokens", "Prompt tokens of finished jobs", per_model, registry=reg
        )
        self.ttft = Histogram(
            "rbee_time_to_first_token_seconds",
            "From a worker taking a job to its first token (queue wait not included)",
            per_model,
            registry=reg,
            buckets=TTFT_BUCKETS_S,
        )
        self.inter_token = Histogram(
            "rbee_inter_token_seconds",
            "A job's mean time between tokens (one observation per job of 2 tokens or more)",
            per_model,
            registry=reg,
            buckets=INTER_TOKEN_BUCKETS_S,
        )
        self.load = Histogram(
            "rbee_model_load_seconds",
            "From a worker's start to its model loaded and ready",
            per_model,
            registry=reg,
            buckets=LOAD_BUCKETS_S,
        )
        self.download_bytes = Counter(
            "rbee_download_bytes", "Bytes of model files downloaded", ["node"], registry=reg
        )
        self.download_failures = Counter(
            "rbee_download_failures",
            "Model downloads that failed, by code",
            ["node", "code"],
            registry=reg,
        )
        self.present = _Present(node)
        reg.register(self.present)
        self.refreshed_at = 0.0

    # ------------------------------------------------------------------ facts

    def job_done(self, model: str, done: Done) -> None:
        """A job's Done frame: ``canceled`` when its keeper stopped it, else ``done``."""
        canceled = done.stop_reason == "canceled"
        outcome, code = ("canceled", "CANCELED") if canceled else ("done", "")
        self.jobs.labels(self.node, model, outcome, code).inc()
        if done.tokens:
            self.tokens.labels(self.node, model).inc(done.tokens)
            self.ttft.labels(self.node, model).observe(done.ttft_s)
        if done.prompt_tokens:
            self.prompt_tokens.labels(self.node, model).inc(done.prompt_tokens)
        if done.tokens > 1:
            gap = done.decode_s / (done.tokens - 1)
            self.inter_token.labels(self.node, model).observe(gap)

    def job_failed(self, model: str, code: str) -> None:
        """A job that ended with an error ``code`` (``model`` "" when it was refused before it
        was queued)."""
        outcome = "canceled" if code in STOPPED_CODES else "error"
        self.jobs.labels(self.node, model, outcome, code).inc()

    def worker_loaded(self, worker: WorkerRecord) -> None:
        """A worker became ready after ``worker.load_s`` seconds."""
        self.load.labels(self.node, worker.model).observe(worker.load_s)

    def downloaded(self, nbytes: int) -> None:
        """``nbytes`` more of a model file arrived (any thread)."""
        self.download_bytes.labels(self.node).inc(nbytes)

    def download_failed(self, code: str) -> None:
        """A pull ended with error ``code`` (any thread); a canceled pull is no failure."""
        if code != "CANCELED":
            self.download_failures.labels(self.node, code).inc()

    def refresh(self, queue: int, workers: Iterable[WorkerRecord], now: float) -> None:
        """Publish the present: the queue's length and every worker (loop thread)."""
        samples = tuple(WorkerSample.of(w) for w in workers)
        self.present.snapshot = Snapshot(queue, samples)
        self.refreshed_at = now

    def due(self, now: float) -> bool:
        """Whether the published present is older than METRICS_REFRESH_S."""
        return now - self.refreshed_at >= METRICS_REFRESH_S

    def text(self) -> str:
        """Every metric in Prometheus' text exposition format."""
        return generate_latest(self.registry).decode("utf-8")

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` over HTTP on ``host:port``, a loopback address only."""
        return MetricsServer(self.registry, host, port)


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on loopback, on a thread of its own;
    CannotListen when the port is taken."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        require_loopback(host)  # the hive and rbee.cli check it first: never the LAN here
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            errno_ = exc.errno or 0
            reason = exc.strerror or str(exc)
            raise cannot_listen(host, port, errno_, reason, "--metrics-port") from None
        self.thread.name = "metrics-http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.server.server_port}/metrics"

    def close(self) -> None:
        """Stop serving and wait for the server's thread (bounded)."""
        self.server.shutdown()  # returns once serve_forever has (it polls every 0.5 s)
        self.server.server_close()
        self.thread.join(METRICS_SERVER_STOP_S)
