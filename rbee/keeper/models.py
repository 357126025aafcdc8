"""`rbee models …`: this machine's model catalog.

``list`` and ``show`` read the catalog (and ``show`` the GGUF header) on this machine alone: no
hive is asked. Their ``--json`` forms write one document to stdout with the same field names as
the catalog's columns, so scripts read what `rbee models list` shows without parsing a table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import zmq

from rbee.catalog import Catalog, ModelEntry, listed_entries
from rbee.errors import HiveUnreachable, InvalidModel, ModelInUse, ModelNotFound
from rbee.gguf import GGUFError, GGUFInfo, read_gguf_info
from rbee.hub import chunks
from rbee.keeper.nodes import REQUEST_TIMEOUT_S, size, table
from rbee.keeper.survey import local_view
from rbee.paths import catalog_path, data_dir
from rbee.protocol.messages import DEFAULT_MODEL, ModelPulled, Progress, PullModel, StopWorker
from rbee.terminal import cell, safe
from rbee.worker.template import supports_tools

PULL_WAIT_S = 5.0  # the hive reports a download's progress twice a second
# llama.cpp's LLAMA_POOLING_TYPE_*: an embedding model says how it pools its token vectors
POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
OPTIONAL_FIELDS = ("sha256", "repo", "file", "revision")  # "" in the catalog: not recorded


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


def entry_record(entry: ModelEntry) -> dict[str, Any]:
    """A catalog entry for ``--json``: every column under its own name; what the catalog did not
    record (no sha256, no Hub source, never used) is null rather than "" or 0."""
    record = asdict(entry)
    for name in OPTIONAL_FIELDS:
        record[name] = record[name] or None
    record["last_used_at"] = entry.last_used_at or None
    return record


def list_models(as_json: bool = False, out: TextIO = sys.stdout) -> list[ModelEntry]:
    """Print the catalog as a table, or as a JSON list of entry_record (the bundled default
    model is added if installed)."""
    entries = listed_entries(catalog_path())
    if as_json:
        out.write(json.dumps([entry_record(e) for e in entries], indent=2) + "\n")
        return entries
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


def show_model(name: str, as_json: bool = False, out: TextIO = sys.stdout) -> dict[str, Any]:
    """`rbee models show NAME`: one entry and what its GGUF header says (the chat template in
    full). A model whose file is gone or unreadable is still shown, from the catalog alone (its
    sha256 and source say how to get it back), and then reported as INVALID_MODEL."""
    catalog = Catalog(catalog_path())
    try:
        entry = catalog.get(name)
        if entry is None and name == DEFAULT_MODEL:
            entry = catalog.ensure_default()  # listed by `rbee models list` before any import
        if entry is None:
            raise _unknown(catalog, name)
    finally:
        catalog.close()
    record = entry_record(entry)
    try:
        record["gguf"], record["gguf_error"] = gguf_details(read_gguf_info(entry.path)), None
    except GGUFError as exc:
        record["gguf"], record["gguf_error"] = None, str(exc)
    out.write(json.dumps(record, indent=2) + "\n" if as_json else details_text(record))
    if record["gguf_error"] is not None:
        raise InvalidModel(
            f"the file of model {entry.name!r} cannot be read: {record['gguf_error']}",
            suggestion=f"import it again, or `rbee models rm {entry.name}`",
        )
    return record


def _unknown(catalog: Catalog, name: str) -> ModelNotFound:
    """The catalog's error for an unknown name (it lists the known ones), pointing at the list;
    the removed bundled default keeps its own hint, how to bring it back."""
    error = catalog.not_found(name)
    if name == DEFAULT_MODEL and "removed" in error.message:
        return error
    return ModelNotFound(
        error.message,
        suggestion="`rbee models list` shows every model; `rbee models import PATH` or "
        "`rbee models pull hf:ORG/REPO` adds one",
    )


def gguf_details(info: GGUFInfo) -> dict[str, Any]:
    """What a GGUF header says beyond the catalog's columns, each null when the file is silent:
    the shape (layers, embedding width, experts), the tokenizer, an embedding model's pooling,
    and the chat template with whether it can render tools."""
    meta, arch = info.metadata, info.architecture

    def number(key: str) -> int | float | None:
        value = meta.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    def text(key: str) -> str | None:
        value = meta.get(key)
        return value if isinstance(value, str) and value else None

    pooling = number(f"{arch}.pooling_type")
    template = text("tokenizer.chat_template")
    return {
        "gguf_version": info.version,
        "general_name": text("general.name"),
        "size_label": text("general.size_label"),
        "license": text("general.license"),
        "file_type": info.file_type,
        "tensor_count": info.tensor_count,
        "block_count": number(f"{arch}.block_count"),
        "embedding_length": number(f"{arch}.embedding_length"),
        "expert_count": number(f"{arch}.expert_count"),
        "rope_freq_base": number(f"{arch}.rope.freq_base"),
        "vocab_size": number("tokenizer.ggml.tokens"),  # an array: the header gives its length
        "tokenizer_model": text("tokenizer.ggml.model"),
        "bos_token_id": number("tokenizer.ggml.bos_token_id"),
        "eos_token_id": number("tokenizer.ggml.eos_token_id"),
        "pooling_type": None if pooling is None else POOLING_TYPES.get(int(pooling), str(pooling)),
        "chat_template": template,
        "template_mentions_tools": bool(template and supports_tools(template)),
    }


def details_text(record: dict[str, Any]) -> str:
    """show_model's record for people: one ``label  value`` line each, the rows the file is
    silent on left out, then the chat template as it is. What a file wrote is shown escaped."""
    g: dict[str, Any] | None = record["gguf"]
    count = record["parameter_count"]
    rows: list[tuple[str, object]] = [
        ("name", record["name"]),
        ("path", record["path"]),
        ("size", f"{size(record['size_bytes'])} ({record['size_bytes']} bytes)"),
        ("sha256", record["sha256"] or "not recorded"),
        ("source", _source(record)),
        ("revision", record["revision"]),
        ("architecture", record["architecture"]),
        ("quantization", record["quantization"]),
        ("parameters", f"{count / 1e6:.1f}M ({count})"),
        ("context", f"{record['context_length']} tokens" if record["context_length"] else "?"),
    ]
    if g is None:
        rows.append(("file", f"unreadable: {record['gguf_error']}"))
    else:
        vocab = g["vocab_size"]
        rows += [
            ("layers", g["block_count"]),
            ("embedding", g["embedding_length"]),
            ("experts", g["expert_count"]),
            ("vocabulary", vocab and f"{vocab} tokens ({g['tokenizer_model'] or '?'} tokenizer)"),
            ("pooling", g["pooling_type"]),
            ("gguf", f"version {g['gguf_version']}, {g['tensor_count']} tensors"),
            ("general.name", g["general_name"]),
            ("license", g["license"]),
        ]
    lines = [f"{label:<14}{_one_line(str(v))}" for label, v in rows if v is not None and v != ""]
    if g is not None and g["chat_template"] is None:
        lines.append("chat template none")
    elif g is not None:
        tools = "mentions tools" if g["template_mentions_tools"] else "does not mention tools"
        lines += [f"chat template ({tools}):", safe(g["chat_template"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return safe(text).replace("\n", "\\n").replace("\t", " ")


def _source(record: dict[str, Any]) -> str:
    if record["provider"] == "hf":
        return f"{record['reference']} ({record['repo']}, {record['file']})"
    return "imported from a local file" if record["provider"] == "file" else record["provider"]


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
            chunks.forget(part)
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


def pull_model(
    reference: str,
    node: str | None,
    hub: bool = True,
    peers: bool = True,
    err: TextIO = sys.stderr,
) -> None:
    """`rbee models pull REF`: download a Hub model into a hive's catalog, with progress;
    ``hub``/``peers``: whether the hive may take the bytes from the Hub / from peer hives."""
    from rbee.keeper.connect import connect
    from rbee.keeper.infer import Reporter

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    report = Reporter(err)
    try:
        link = connect(ctx, node, reference, preload=False)
        try:
            for note in link.notes:
                report.phase("hive", note)
            rid = link.client.send(PullModel(reference=reference, hub=hub, peers=peers))
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
