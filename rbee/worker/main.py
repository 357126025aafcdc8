"""The worker process: one loaded model, started by a hive, talking only to that hive.

Two threads, each owning its sockets (a ZeroMQ rule):

* the control thread (main) owns the DEALER to the hive: it forwards loading progress and the
  readiness callback, sends heartbeats, takes RunJob/CancelJob/StopRequest, and exits when the
  hive goes away;
* the generation thread owns llama.cpp and the XPUB that streams tokens to the hive. It runs
  the batch loop (rbee.worker.slots): up to ``--slots`` jobs decoded together, one step at a
  time, taking new jobs between steps. Before it reports Ready it waits for the hive's
  subscription to arrive, so no token is ever published into the void; the hop to the hive has
  no high-water mark, so none is dropped either.

The threads talk over an inproc PAIR (frames up) and a queue plus per-job events (jobs down).

A CUDA worker is started with CUDA_VISIBLE_DEVICES naming its one GPU (rbee.hive.supervisor), so
inside it that GPU is CUDA device 0 whatever its index on the machine; ``--device`` keeps the
machine's (NVML's) index, which is what the worker reports and what NVML measures.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

import psutil
import zmq

from rbee import gpu, log
from rbee.errors import InternalError, InvalidModel, RbeeError
from rbee.process import die_with_parent
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    SYNTHETIC_PREFIX,
    CancelJob,
    Heartbeat,
    RunJob,
    StopRequest,
    WorkerFailed,
    WorkerLoading,
    WorkerReady,
)
from rbee.transport.sockets import LINGER_MS, LOCAL_HWM, connect, new_socket
from rbee.worker.args import WorkerArgs
from rbee.worker.engine import Engine
from rbee.worker.slots import MAX_MESSAGE_CHARS, Slots, SyntheticEngine, TokenFrames

__all__ = ["TokenFrames", "Worker", "main_gpu", "run"]

HEARTBEAT_INTERVAL_S = 1.0
SUBSCRIBE_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.2
PROGRESS_STEP = 0.05
STOP_JOIN_S = 5.0
PIPE = "inproc://rbee-worker-up"
MAX_CANCELS = 1024  # cancel events kept for recent jobs (far more than slots)

logger = log.get(__name__)


def main_gpu(device: str, environ: Mapping[str, str]) -> int:
    """The CUDA device number llama.cpp should use in this process.

    When CUDA_VISIBLE_DEVICES names exactly one GPU, that GPU is device 0 here; otherwise
    (a worker started by hand) the index given is used as it is.
    """
    visible = environ.get(gpu.CUDA_VISIBLE_DEVICES)
    if visible is not None and len([v for v in visible.split(",") if v.strip()]) == 1:
        return 0
    return int(device) if device.isdigit() else 0


@dataclass(frozen=True)
class Usage:
    """What the loaded worker really holds: RSS, and its process's memory on its GPU."""

    rss_bytes: int
    vram_bytes: int


def measure_usage(backend: str, device: str, used_before: int | None) -> Usage:
    """RSS from the OS; GPU memory from NVML's per-process accounting, or, where NVML hides
    processes (another PID namespace), the growth of the device's used memory while loading."""
    rss = psutil.Process().memory_info().rss
    if backend != "cuda":
        return Usage(rss_bytes=rss, vram_bytes=0)
    vram = gpu.process_vram_bytes(os.getpid())
    if vram is None and device.isdigit() and used_before is not None:
        used_after = gpu.device_used_bytes(int(device))
        vram = max(0, used_after - used_before) if used_after is not None else None
    return Usage(rss_bytes=rss, vram_bytes=vram or 0)


class Generator(threading.Thread):
    """Loads the model, then runs the batch loop over its slots and publishes their frames."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], args: WorkerArgs) -> None:
        super().__init__(name="generation", daemon=True)
        self.ctx = ctx
        self.args = args
        self.jobs: queue.Queue[tuple[RunJob, threading.Event] | None] = queue.Queue()

    def run(self) -> None:
        up = new_socket(self.ctx, zmq.PAIR)
        up.connect(PIPE)
        pub = new_socket(self.ctx, zmq.XPUB)
        pub.setsockopt(zmq.SNDHWM, LOCAL_HWM)
        connect(pub, self.args.stream)
        try:
            self._serve(up, pub)
        except Exception as exc:  # report anything unexpected instead of dying silently
            error = InternalError.of(exc)
            logger.error("worker failed", code=error.code, error=error.message)
            failed = WorkerFailed(
                worker_id=self.args.worker_id,
                code=error.code,
                message=error.message[:MAX_MESSAGE_CHARS],
            )
            up.send(encode(failed))
        finally:
            pub.close(LINGER_MS)
            up.close(LINGER_MS)

    def _serve(self, up: zmq.Socket[bytes], pub: zmq.Socket[bytes]) -> None:
        wid = self.args.worker_id
        started = time.perf_counter()
        last = [-1.0]

        def on_progress(fraction: float) -> None:
            if fraction - last[0] >= PROGRESS_STEP or fraction >= 1.0 > last[0]:
                last[0] = fraction
                up.send(encode(WorkerLoading(worker_id=wid, fraction=fraction)))

        args = self.args
        logger.info(
            "loading model",
            path=args.model_path,
            n_ctx=args.n_ctx,
            threads=args.threads,
            extra_bufts=args.extra_bufts,
            backend=args.backend,
            device=args.device,
            cuda_visible_devices=os.environ.get(gpu.CUDA_VISIBLE_DEVICES),
        )
        cuda = args.backend == "cuda"
        first = args.device.split("+")[0]  # "0+1": layers over several GPUs
        used_before = gpu.device_used_bytes(int(first)) if cuda and first.isdigit() else None
        engine: Engine | SyntheticEngine
        if args.model_path.startswith(SYNTHETIC_PREFIX):
            on_progress(1.0)
            engine = SyntheticEngine(args.model_path, args.slots)
        else:
            engine = Engine(
                args.model_path,
                args.n_ctx,
                on_progress,
                args.backend,
                main_gpu(args.device, os.environ),
                args.threads,
                args.extra_bufts,
                args.slots,
                args.gpu_layers,
                args.layers,
                args.rpc,
            )
            engine.pieces  # noqa: B018 - read the vocabulary now, not in the first job
        load_s = time.perf_counter() - started
        usage = measure_usage(args.backend, args.device, used_before)
        gpu_layers = engine.gpu_layers
        logger.info(
            "model loaded",
            load_s=round(load_s, 3),
            gpu_layers=gpu_layers,
            rss_mib=usage.rss_bytes >> 20,
            vram_mib=usage.vram_bytes >> 20,
        )
        if not pub.poll(int(SUBSCRIBE_TIMEOUT_S * 1000)):
            raise InvalidModel("the hive's stream never subscribed to this worker")
        pub.recv()  # the hive's subscribe-to-everything
        up.send(
            encode(
                WorkerReady(
                    worker_id=wid,
                    pid=os.getpid(),
                    n_ctx=engine.n_ctx,
                    has_chat_template=engine.has_chat_template,
                    load_s=load_s,
                    backend=args.backend,
                    device=args.device if cuda else "cpu",
                    gpu_layers=gpu_layers,
                    rss_bytes=usage.rss_bytes,
                    vram_bytes=usage.vram_bytes,
                    slots=args.slots,
                    n_layers=engine.n_layers,
                )
            )
        )

        def publish(topic: bytes, data: bytes) -> None:
            pub.send_multipart([topic, data])

        self._loop(Slots(engine, publish, args.stream_interval_ms / 1000))

    def _take(self, wait: bool) -> list[tuple[RunJob, threading.Event] | None]:
        """Every job handed over since the last step (the first one waited for if ``wait``);
        None stands for "stop"."""
        taken = [self.jobs.get()] if wait else []
        while True:
            try:
                taken.append(self.jobs.get_nowait())
            except queue.Empty:
                return taken

    def _loop(self, slots: Slots) -> None:
        """Take jobs between steps (waiting for one only while no slot is busy) and step."""
        while True:
            for item in self._take(wait=not slots.busy()):
                if item is None:
                    slots.stop()
                    return
                slots.admit(*item)
            if slots.busy():
                try:
                    slots.step()
                except Exception as exc:  # llama.cpp failures must still end every stream
                    logger.exception("generation failed", jobs=slots.running())
                    slots.fail_all(InternalError.of(exc))


class Worker:
    """The control thread's state."""

    def __init__(self, args: WorkerArgs) -> None:
        self.args = args
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.stopping = False
        self.cancels: dict[str, threading.Event] = {}

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        """Signal handler and StopRequest: leave the loop at the next turn."""
        self.stopping = True

    def run(self) -> int:
        """Run until told to stop or the hive goes away; the exit code says which."""
        up = new_socket(self.ctx, zmq.PAIR)
        up.bind(PIPE)
        control = new_socket(self.ctx, zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, self.args.worker_id.encode())
        connect(control, self.args.control)
        generator = Generator(self.ctx, self.args)
        generator.start()
        poller = zmq.Poller()
        poller.register(up, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        next_beat = 0.0
        code = 0
        try:
            while not self.stopping:
                events = dict(poller.poll(int(POLL_INTERVAL_S * 1000)))
                if up in events:
                    data = up.recv()
                    control.send(data)
                    if isinstance(decode(data).frame, WorkerFailed):
                        code = 1
                        break
                if control in events:
                    self._on_control(control.recv(), generator)
                now = time.monotonic()
                if now >= next_beat:
                    control.send(encode(Heartbeat(worker_id=self.args.worker_id)))
                    next_beat = now + HEARTBEAT_INTERVAL_S
                if os.getppid() != self.args.hive_pid:
                    logger.warning("hive is gone; exiting", hive_pid=self.args.hive_pid)
                    break
        finally:
            for event in self.cancels.values():
                event.set()
            generator.jobs.put(None)
            generator.join(STOP_JOIN_S)
            up.close(LINGER_MS)
            control.close(LINGER_MS)
            self.ctx.destroy(linger=0)  # the generation thread may still hold its sockets
        return code

    def _on_control(self, data: bytes, generator: Generator) -> None:
        try:
            frame = decode(data).frame
        except RbeeError as exc:
            logger.warning("dropped a malformed frame from the hive", error=str(exc))
            return
        if isinstance(frame, RunJob):
            event = threading.Event()
            self.cancels[frame.job_id] = event
            if len(self.cancels) > MAX_CANCELS:  # the oldest jobs ended long ago
                del self.cancels[next(iter(self.cancels))]
            generator.jobs.put((frame, event))
        elif isinstance(frame, CancelJob):
            if frame.job_id in self.cancels:
                self.cancels[frame.job_id].set()
        elif isinstance(frame, StopRequest):
            self.request_stop()


def run(args: WorkerArgs) -> int:
    """Entry point of `rbee worker`."""
    faulthandler.enable(all_threads=True)  # a crash inside llama.cpp leaves a Python stack
    die_with_parent()
    log.configure("worker")
    log.bind(worker=args.worker_id)
    worker = Worker(args)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal goes to the hive first
    return worker.run()
