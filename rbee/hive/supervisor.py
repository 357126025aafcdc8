"""Starting and stopping worker processes, and relaying what they print.

A worker is this same program run again (`rbee worker …`), so spawning works unchanged from a
PyInstaller binary. Its stderr is read by a thread that keeps the last lines (shown to the keeper
when loading fails) and re-logs every line tagged with the worker id.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field

from rbee import log
from rbee.paths import self_command
from rbee.process import child_env

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


def spawn_worker(
    worker_id: str, model_path: str, control: str, stream: str, n_ctx: int
) -> WorkerProcess:
    """Start `rbee worker` for one model; it connects back to ``control`` and ``stream``."""
    argv = [
        *self_command(),
        "worker",
        "--worker-id",
        worker_id,
        "--model-path",
        model_path,
        "--control",
        control,
        "--stream",
        stream,
        "--n-ctx",
        str(n_ctx),
        "--hive-pid",
        str(os.getpid()),
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    wp = WorkerProcess(worker_id=worker_id, proc=proc)
    wp.reader = threading.Thread(
        target=_relay_stderr, args=(wp,), name=f"stderr-{worker_id}", daemon=True
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
