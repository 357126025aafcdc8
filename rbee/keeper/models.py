"""`rbee models …`: this machine's model catalog."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import zmq

from rbee.catalog import Catalog, ModelEntry, listed_entries
from rbee.errors import HiveUnreachable, ModelInUse
from rbee.keeper.nodes import REQUEST_TIMEOUT_S, size, table
from rbee.keeper.survey import local_view
from rbee.paths import catalog_path, data_dir
from rbee.protocol.messages import DEFAULT_MODEL, ModelPulled, Progress, PullModel, StopWorker
from rbee.terminal import cell, safe

PULL_WAIT_S = 5.0  # the hive reports a download's progress twice a second


def import_model(path: str, name: str | None, out: TextIO = sys.stdout) -> ModelEntry:
    """Register a local GGUF in this machine's catalog."""
    catalog = Catalog(catalog_path())
    try:
        entry = catalog.add(Path(path), name)
    finally:
        catalog.close()
    out.write(
        f"imported {cell(entry.name)}: {cell(entry.architecture)} {cell(entry.quantization)}, "
        f"{entry.parameter_count / 1e6:.0f}M parameters, context {entry.context_length}, "
        f"{size(entry.size_bytes)}, sha256 {entry.sha256[:12]}…\n"
    )
    return entry


def list_models(out: TextIO = sys.stdout) -> list[ModelEntry]:
    """Print the catalog as a table (the bundled default model is added if installed)."""
    entries = listed_entries(catalog_path())
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
                size(e.size_bytes),
                e.path,
            ]
        )
    table(rows, out)
    return entries


def remove_model(name: str, force: bool = False, out: TextIO = sys.stdout) -> None:
    """Forget a model. A file rbee downloaded is deleted; an imported file is kept. Workers of
    this machine's hive that hold it are stopped with ``force`` and refuse the removal without:
    they would go on serving a model the catalog no longer lists."""
    catalog = Catalog(catalog_path())
    try:
        if catalog.get(name) is None:
            raise catalog.not_found(name)
        _stop_holders(name, force, out)
        entry = catalog.remove(name)
    finally:
        catalog.close()
    path = Path(entry.path)
    if entry.provider == "hf" and path.is_relative_to(data_dir() / "models"):
        for part in path.parent.glob(split_glob(path.name)):
            part.unlink(missing_ok=True)
        out.write(safe(f"removed {entry.name} and deleted its download {path}") + "\n")
    else:
        out.write(
            safe(f"removed {entry.name} from the catalog (the file {entry.path} was kept)") + "\n"
        )
    if entry.name == DEFAULT_MODEL:
        out.write(
            f"(the bundled default: `rbee models import {entry.path} --name {entry.name}`"
            " brings it back)\n"
        )


def _stop_holders(name: str, force: bool, out: TextIO) -> None:
    """Stop the local hive's workers holding ``name`` (with ``force``), else refuse if any."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    here = None
    try:
        here = local_view(ctx)
        if here is None or here.status is None or here.client is None:
            return  # no hive runs here: no worker holds anything
        holders = [w.worker_id for w in here.status.workers if w.model == name]
        if holders and not force:
            raise ModelInUse(
                f"{name} is loaded by worker {', '.join(holders)} of this machine's hive",
                suggestion=f"`rbee models rm {name} --force` stops it first (a job it runs "
                "ends with JOB_STOPPED), or wait for its keep-alive to end",
            )
        for worker_id in holders:
            here.client.request(StopWorker(worker_id=worker_id), REQUEST_TIMEOUT_S)
            out.write(f"stopped worker {worker_id}, which held {name}\n")
    finally:
        if here is not None:
            here.close()
        ctx.destroy(linger=0)


def split_glob(filename: str) -> str:
    """A pattern matching every part of a split GGUF (or just the file itself)."""
    stem, sep, _ = filename.rpartition("-00001-of-")
    return f"{stem}-0*-of-*.gguf" if sep else filename


def pull_model(reference: str, node: str | None, err: TextIO = sys.stderr) -> None:
    """`rbee models pull REF`: download a Hub model into a hive's catalog, with progress."""
    from rbee.keeper.connect import connect
    from rbee.keeper.infer import Reporter

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    report = Reporter(err)
    try:
        link = connect(ctx, node, reference, preload=False)
        try:
            for note in link.notes:
                report.phase("hive", note)
            rid = link.client.send(PullModel(reference=reference))
            for frame in link.client.replies(rid, PULL_WAIT_S):
                if isinstance(frame, Progress) and frame.total:
                    report.download(frame.done, frame.total, frame.message)
                elif isinstance(frame, Progress):
                    report.phase("download", f"pulling {frame.message} on {link.hello.node}")
                elif isinstance(frame, ModelPulled):
                    verb = "downloaded" if frame.downloaded else "already had"
                    report.phase(
                        "done",
                        f"{link.hello.node} {verb} {frame.reference} as {frame.name} "
                        f"({size(frame.size_bytes)}, sha256 {frame.sha256[:12]}…)",
                    )
                    return
        except HiveUnreachable as exc:
            raise link.lost(exc) from None
        finally:
            link.close()
    finally:
        ctx.destroy(linger=0)
