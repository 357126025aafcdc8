"""``GET /v1/models``: every model of every hive in reach, with where it lives.

OpenAI's list shape, plus an ``rbee`` field per model naming each node that holds it and
whether a worker there has it loaded, so a person can see why a request went where it did.
With no hive in reach (a request would then run on an ephemeral hive), this machine's catalog
is listed under the node ``ephemeral``.
"""

from __future__ import annotations

from typing import Any

import zmq

from rbee.catalog import listed_entries
from rbee.keeper.link import open_link
from rbee.keeper.nodes import REQUEST_TIMEOUT_S
from rbee.keeper.survey import survey
from rbee.paths import catalog_path
from rbee.protocol.messages import HiveStatus, Status

LIST_BROWSE_S = 0.6  # as long as `rbee infer` browses before choosing


def list_models(ctx: zmq.Context[zmq.Socket[bytes]], node: str | None) -> dict[str, Any]:
    """The model list (blocking: asks every hive in reach, or only ``node``)."""
    places: list[tuple[str, str, HiveStatus]] = []
    if node:
        link = open_link(ctx, node)
        try:
            status = link.client.request(Status(), REQUEST_TIMEOUT_S)
            assert isinstance(status, HiveStatus)
            places.append((link.hello.node, link.client.endpoint.removeprefix("tcp://"), status))
        finally:
            link.close()
    else:
        for view in survey(ctx, browse_s=LIST_BROWSE_S):
            if view.status is not None:
                places.append((view.name, view.endpoint, view.status))
    if not places and not node:
        return shape(_local_catalog())
    return shape(places)


def _local_catalog() -> list[tuple[str, str, HiveStatus]]:
    models = [e.info() for e in listed_entries(catalog_path())]
    status = HiveStatus(
        node="ephemeral",
        rbee_version="",
        protocol_version=0,
        models=models,
        cpu_count=0,
        ram_total_bytes=0,
        ram_free_bytes=0,
        disk_free_bytes=0,
    )
    return [("ephemeral", "", status)]


def shape(places: list[tuple[str, str, HiveStatus]]) -> dict[str, Any]:
    """OpenAI's list of models from (node name, address, status) triples; pure."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for name, address, status in places:
        for m in status.models:
            workers = [w for w in status.workers if w.model == m.name]
            by_model.setdefault(m.name, []).append(
                {
                    "node": name,
                    "address": address,
                    "loaded": any(w.state in ("idle", "busy") for w in workers),
                    "workers": [
                        {"id": w.worker_id, "state": w.state, "n_ctx": w.n_ctx} for w in workers
                    ],
                    "architecture": m.architecture,
                    "quantization": m.quantization,
                    "parameters": m.parameter_count,
                    "context_length": m.context_length,
                    "size_bytes": m.size_bytes,
                    "tools": m.tools,
                }
            )
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "rbee",
                "rbee": {"nodes": nodes},
            }
            for model, nodes in sorted(by_model.items())
        ],
    }
