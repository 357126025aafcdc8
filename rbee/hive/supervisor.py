"""Starting and stopping worker processes, and relaying what they print.

A worker is this same program run again (`rbee worker …`), so spawning works unchanged from a
PyInstaller binary. Its stderr is read by a thread that keeps the last lines (shown to the keeper
when loading fails) and re-logs every line tagged with the worker id.

Each worker sees exactly its own device: a CUDA worker gets CUDA_VISIBLE_DEVICES set to its
GPU's UUID (NVML and CUDA may number GPUs differently, a UUID means the same GPU to both), and a
CPU worker gets it empty, so a CUDA build of llama.cpp neither offloads a CPU worker's big
matrix products to a GPU nor takes a CUDA context's memory on one.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field

from rbee import log
from rbee.gpu import CUDA_VISIBLE_DEVICES
from rbee.paths import self_command
from rbee.process import child_env
from rbee.worker.args import WorkerArgs

STDERR_TAIL_LINES = 30
TERM_GRACE_S = 3.0

logger = log.get(__name__)


@dataclass(eq=False)
class WorkerProcess:
    """A running worker process and the tail of its stderr."""

    worker_id: str
    proc: subprocess.Popen[bytes]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def stderr_tail(self) -> str:
        """The last lines the worker printed, oldest first."""
        if self.reader is not None:
            self.reader.join(timeout=1.0)  # let the reader catch the final lines
        return "\n".join(self.tail)


def device_env(backend: str, device: str = "", uuid: str = "") -> dict[str, str]:
    """The variables that confine a worker to its device (see the module docstring).

    ``device`` is the GPU's NVML index, ``uuid`` its NVML UUID; without a UUID the index is
    used, with CUDA told to number devices in PCI bus order as NVML does.
    """
    if backend != "cuda":
        return {CUDA_VISIBLE_DEVICES: ""}
    return {CUDA_VISIBLE_DEVICES: uuid or device or "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def spawn_worker(
    args: WorkerArgs, uuid: str = "", engine_env: dict[str, str] | None = None
) -> WorkerProcess:
    """Start `rbee worker` for one model on one device; it connects back to ``args.control`` and
    ``args.stream``. ``uuid``: the CUDA GPU's NVML UUID; ``engine_env``: the CPU variant's."""
    proc = subprocess.Popen(
        [*self_command(), "worker", *args.argv()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env({**device_env(args.backend, args.device, uuid), **(engine_env or {})}),
    )
    wp = WorkerProcess(worker_id=args.worker_id, proc=proc)
    wp.reader = threading.Thread(
        target=_relay_stderr, args=(wp,), name=f"stderr-{args.worker_id}", daemon=True
    )
    wp.reader.start()
    return wp


def _relay_stderr(wp: WorkerProcess) -> None:
    assert wp.proc.stderr is not None
    for raw in wp.proc.stderr:
        line = raw.decode("utf-8", "replace").rstrip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            wp.tail.append(line)
            logger.info("worker output", worker=wp.worker_id, line=line)
            continue
        event = str(record.pop("event", "worker log"))
        level = str(record.pop("level", "info"))
        for key in ("timestamp", "component", "worker"):
            record.pop(key, None)
        details = " ".join(f"{k}={v}" for k, v in record.items())
        wp.tail.append(f"{level}: {event} {details}".rstrip())
        log_at = getattr(logger, level if level in ("debug", "warning", "error") else "info")
        log_at(event, worker=wp.worker_id, **record)


def signal_worker(wp: WorkerProcess, sig: signal.Signals) -> None:
    """Send a signal, ignoring a process that already exited."""
    if wp.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            wp.proc.send_signal(sig)
