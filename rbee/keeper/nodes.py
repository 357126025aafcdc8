"""`rbee nodes` and `rbee ps`: what every hive in reach says about itself and its workers."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import zmq

from rbee.gpu import where_text
from rbee.keeper.connect import open_named
from rbee.keeper.survey import HiveView, survey
from rbee.protocol.messages import (
    PROTOCOL_VERSION,
    DeviceInfo,
    GetLogs,
    HiveStatus,
    ListWorkers,
    LogLines,
    StopWorker,
    WorkerInfo,
    WorkerList,
)
from rbee.terminal import cell, safe

NODES_BROWSE_S = 1.5
REQUEST_TIMEOUT_S = 5.0
FOLLOW_INTERVAL_S = 1.0


def size(n: float) -> str:
    """Bytes for people (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def table(rows: list[list[str]], out: TextIO) -> None:
    """Left-aligned columns; each cell on one line, cut to fit, escapes shown."""
    rows = [[cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def state_text(v: HiveView) -> str:
    """The STATE column: ok, draining, unreachable (why), incompatible, CLONED NODE ID."""
    notes = []
    if v.error_code == "VERSION_MISMATCH":
        notes.append(f"incompatible: {v.error}")
    elif v.hello is None:
        notes.append(f"unreachable ({v.error})" if v.error else "unreachable")
    elif v.hello.protocol_version != PROTOCOL_VERSION:
        notes.append(f"incompatible (protocol {v.hello.protocol_version})")
    else:
        notes.append(v.hello.status)
    if v.cloned_id:
        notes.append("CLONED NODE ID")
    return ", ".join(notes)


def _record(v: HiveView) -> dict[str, Any]:
    s, a = v.status, v.announcement
    return {
        "name": v.name,
        "address": v.endpoint,
        "source": v.source,
        "state": state_text(v),
        "node_id": a.node_id if a else None,
        "rbee_version": v.hello.rbee_version if v.hello else (a.rbee_version if a else None),
        "protocol_version": v.candidate().protocol_version,
        "backends": a.backends if a else _backends(s),
        "devices": [d.to_wire() for d in s.devices] if s else [],
        "ram_free_bytes": s.ram_free_bytes if s else None,
        "ram_total_bytes": s.ram_total_bytes if s else None,
        "workers": [w.to_wire() for w in s.workers] if s else [],
        "models": [m.name for m in s.models] if s else [],
        "queue_length": s.queue_length if s else None,
        "engine": s.engine if s else None,
    }


def _backends(status: HiveStatus | None) -> str:
    """Backends from a status (a hive reached without its announcement, e.g. RBEE_SEEDS)."""
    cuda = status is not None and any(d.backend == "cuda" and d.usable for d in status.devices)
    return "cpu,cuda" if cuda else "cpu"


def gpus_text(status: HiveStatus) -> str:
    """``1× NVIDIA H100 80GB HBM3, 84.5 GB free`` per kind of GPU; unusable ones say why."""
    gpus = [d for d in status.devices if d.backend == "cuda"]
    if not gpus:
        return "-"
    kinds: dict[str, list[DeviceInfo]] = {}
    for d in gpus:
        kinds.setdefault(d.name, []).append(d)
    parts = []
    for name, same in kinds.items():
        free = size(sum(d.free_bytes for d in same))
        unusable = next((d.note for d in same if not d.usable), "")
        parts.append(f"{len(same)}× {name}, {free} free" + (f" ({unusable})" if unusable else ""))
    return "; ".join(parts)


def list_nodes(
    as_json: bool, timeout_s: float = NODES_BROWSE_S, out: TextIO = sys.stdout
) -> list[HiveView]:
    """`rbee nodes`: every hive in reach, within a bounded wait."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        views = survey(ctx, browse_s=timeout_s)
    finally:
        ctx.destroy(linger=0)  # never waits on a socket an error path left open
    if as_json:
        out.write(json.dumps([_record(v) for v in views], indent=2) + "\n")
        return views
    if not views:
        out.write("no hives found (is `rbee hive` running? RBEE_SEEDS lists hosts to ask)\n")
        return views
    rows = [
        ["NAME", "ADDRESS", "VERSION", "BACKENDS", "FREE RAM", "GPUS", "WORKERS", "MODELS", "STATE"]
    ]
    for v in views:
        r = _record(v)
        free = f"{size(r['ram_free_bytes'])}" if r["ram_free_bytes"] is not None else "-"
        version = f"{r['rbee_version'] or '?'}/p{r['protocol_version']}"
        rows.append(
            [
                v.name,
                v.endpoint,
                version,
                r["backends"],
                free,
                gpus_text(v.status) if v.status else "-",
                str(len(r["workers"])),
                str(len(r["models"])),
                r["state"],
            ]
        )
    table(rows, out)
    for v in views:  # too long for a column: the CPU variant, its features, what is off and why
        if v.status is not None and v.status.engine:
            out.write(safe(f"{v.name} engine: {v.status.engine}") + "\n")
    return views


def list_workers(node: str | None, as_json: bool = False, out: TextIO = sys.stdout) -> None:
    """`rbee ps`: the workers of one hive (--node) or of every hive in reach; SLOTS is the jobs
    each runs now of the jobs it can run at once. ``as_json``: a JSON list of worker_record."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        found: list[tuple[str, WorkerInfo]] = []
        if node:
            link = open_named(ctx, node)
            try:
                reply = link.client.request(ListWorkers(), REQUEST_TIMEOUT_S)
                assert isinstance(reply, WorkerList)
                found = [(link.hello.node, w) for w in reply.workers]
            finally:
                link.close()
        else:
            for v in survey(ctx, browse_s=NODES_BROWSE_S):
                found += [(v.name, w) for w in (v.status.workers if v.status else [])]
    finally:
        ctx.destroy(linger=0)  # never waits on a socket an error path left open
    if as_json:
        now = time.time()
        out.write(json.dumps([worker_record(n, w, now) for n, w in found], indent=2) + "\n")
        return
    if not found:
        out.write("no workers\n")
        return
    rows = [
        [
            *("NODE", "WORKER", "MODEL", "STATE", "SLOTS", "WHERE", "PID", "RSS"),
            *("VRAM", "ESTIMATE", "JOBS", "IDLE FOR"),
        ]
    ]
    for name, w in found:
        idle = f"{time.time() - w.last_activity:.0f} s" if w.state == "idle" else "-"
        rows.append(
            [
                name,
                w.worker_id,
                w.model,
                w.state,
                f"{w.slots_busy}/{w.slots}",
                where_text(w),
                str(w.pid),
                size(w.rss_bytes),
                size(w.vram_bytes) if w.backend == "cuda" else "-",
                size(w.estimate_bytes) if w.estimate_bytes else "-",
                str(w.jobs_served),
                idle,
            ]
        )
    table(rows, out)


def worker_record(node: str, w: WorkerInfo, now: float) -> dict[str, Any]:
    """One row of `rbee ps --json`: the node's name, every field the hive reports under its wire
    name, and the two the table derives: ``where`` (as the WHERE column) and ``idle_s`` (null
    unless idle)."""
    idle_s = round(max(0.0, now - w.last_activity), 3) if w.state == "idle" else None
    return {"node": node, **w.to_wire(), "where": where_text(w), "idle_s": idle_s}


def stop_worker(worker_id: str, node: str | None, out: TextIO = sys.stdout) -> None:
    """`rbee workers stop ID`: unload one worker, wherever it runs."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        target = node
        if target is None:
            views = survey(ctx, browse_s=NODES_BROWSE_S)
            owners = [
                v
                for v in views
                if v.status and any(w.worker_id == worker_id for w in v.status.workers)
            ]
            target = owners[0].endpoint if owners else "127.0.0.1"
        link = open_named(ctx, target)
        try:
            link.client.request(StopWorker(worker_id=worker_id), REQUEST_TIMEOUT_S)
        finally:
            link.close()
        out.write(safe(f"stopping {worker_id} on {link.hello.node}") + "\n")
    finally:
        ctx.destroy(linger=0)  # never waits on a socket an error path left open


def show_logs(target: str | None, follow: bool, out: TextIO = sys.stdout) -> None:
    """`rbee logs [NODE|WORKER] [-f]`: a hive's (or one of its workers') recent log lines."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    worker = target if target and target.startswith("w-") else ""
    try:
        node = None if worker else target
        if worker:
            views = survey(ctx, browse_s=NODES_BROWSE_S)
            owners = [
                v
                for v in views
                if v.status and any(w.worker_id == worker for w in v.status.workers)
            ]
            node = owners[0].endpoint if owners else None
        link = open_named(ctx, node or "127.0.0.1")
        try:
            after = 0
            while True:
                request = GetLogs(after=after, worker_id=worker)
                reply = link.client.request(request, REQUEST_TIMEOUT_S)
                assert isinstance(reply, LogLines)
                for line in reply.lines:
                    out.write(safe(render_log_line(line)).replace("\n", "\\n") + "\n")
                out.flush()
                after = reply.last
                if not follow:
                    return
                time.sleep(FOLLOW_INTERVAL_S)
        finally:
            link.close()
    finally:
        ctx.destroy(linger=0)


def render_log_line(line: str) -> str:
    """A JSON log line as one readable line: time, level, worker, event, details."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    when = str(record.pop("timestamp", ""))[11:23]
    level = str(record.pop("level", ""))
    event = str(record.pop("event", ""))
    for known in ("component", "node"):  # the same on every line of one hive
        record.pop(known, None)
    worker = str(record.pop("worker", ""))
    details = " ".join(f"{k}={v}" for k, v in record.items())
    return " ".join(p for p in (when, f"{level:7}", worker, event, details) if p)
