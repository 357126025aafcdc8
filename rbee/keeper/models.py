"""`rbee models …` and `rbee ps`: this machine's catalog, and a hive's workers."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import zmq

from rbee.catalog import Catalog, ModelEntry
from rbee.keeper.link import open_link
from rbee.paths import catalog_path
from rbee.protocol.messages import ListWorkers, StopWorker, WorkerList

REQUEST_TIMEOUT_S = 5.0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def import_model(path: str, name: str | None, out: TextIO = sys.stdout) -> ModelEntry:
    """Register a local GGUF in this machine's catalog."""
    catalog = Catalog(catalog_path())
    try:
        entry = catalog.add(Path(path), name)
    finally:
        catalog.close()
    out.write(
        f"imported {entry.name}: {entry.architecture} {entry.quantization}, "
        f"{entry.parameter_count / 1e6:.0f}M parameters, context {entry.context_length}, "
        f"{_size(entry.size_bytes)}, sha256 {entry.sha256[:12]}…\n"
    )
    return entry


def list_models(out: TextIO = sys.stdout) -> list[ModelEntry]:
    """Print the catalog as a table (the bundled default model is added if installed)."""
    catalog = Catalog(catalog_path())
    try:
        catalog.ensure_default()
        entries = catalog.entries()
    finally:
        catalog.close()
    if not entries:
        out.write("no models yet: `rbee models import PATH` adds a GGUF file\n")
        return entries
    rows = [["NAME", "ARCH", "QUANT", "PARAMS", "CONTEXT", "SIZE", "PATH"]]
    for e in entries:
        rows.append(
            [
                e.name,
                e.architecture,
                e.quantization,
                f"{e.parameter_count / 1e6:.0f}M",
                str(e.context_length),
                _size(e.size_bytes),
                e.path,
            ]
        )
    _table(rows, out)
    return entries


def remove_model(name: str, out: TextIO = sys.stdout) -> None:
    """Forget a model; its file is left where it is."""
    catalog = Catalog(catalog_path())
    try:
        entry = catalog.remove(name)
    finally:
        catalog.close()
    out.write(f"removed {entry.name} from the catalog (the file {entry.path} was kept)\n")


def list_workers(node: str | None, out: TextIO = sys.stdout) -> None:
    """`rbee ps`: a hive's workers (this machine's running hive unless --node)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    link = None
    try:
        link = open_link(ctx, node or "127.0.0.1")
        reply = link.client.request(ListWorkers(), REQUEST_TIMEOUT_S)
        assert isinstance(reply, WorkerList)
        if not reply.workers:
            out.write(f"no workers on {link.hello.node}\n")
            return
        rows = [["NODE", "WORKER", "MODEL", "STATE", "BACKEND", "PID", "RSS", "JOBS", "IDLE FOR"]]
        for w in reply.workers:
            idle = f"{time.time() - w.last_activity:.0f} s" if w.state == "idle" else "-"
            rows.append(
                [
                    link.hello.node,
                    w.worker_id,
                    w.model,
                    w.state,
                    f"{w.backend}:{w.device}",
                    str(w.pid),
                    _size(w.rss_bytes),
                    str(w.jobs_served),
                    idle,
                ]
            )
        _table(rows, out)
    finally:
        if link is not None:
            link.close()
        ctx.term()


def stop_worker(worker_id: str, node: str | None, out: TextIO = sys.stdout) -> None:
    """`rbee workers stop ID`: unload one worker."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    link = None
    try:
        link = open_link(ctx, node or "127.0.0.1")
        link.client.request(StopWorker(worker_id=worker_id), REQUEST_TIMEOUT_S)
        out.write(f"stopping {worker_id} on {link.hello.node}\n")
    finally:
        if link is not None:
            link.close()
        ctx.term()
