"""A receipt for an answer: what served it, from which file, how, and how fast.

The hive says where the job ran when it accepts it (JobAccepted: node, worker, device and GPU
UUIDs, the model's catalog name, sha256 and revision, the llama.cpp build); the keeper adds the
sampling settings it asked for and the worker's totals from Done (time to first token, tokens
per second). `rbee infer --receipt` prints it; the gateway returns it as the ``X-Rbee-Receipt``
header (what is known when the answer starts) and in the ``rbee.receipt`` field.
"""

from __future__ import annotations

import json
from typing import Any

from rbee.protocol.messages import Done, GenerateParams, JobAccepted

SAMPLING = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "ignore_eos")


def receipt(
    accepted: JobAccepted, params: GenerateParams, done: Done | None = None
) -> dict[str, Any]:
    """The receipt as a JSON object; without ``done``, the part known when the job starts."""
    out: dict[str, Any] = {
        "node": accepted.node,
        "worker": accepted.worker_id,
        "job": accepted.job_id,
        "where": accepted.where,
        "device_uuid": accepted.device_uuid or None,
        "model": accepted.model,
        "model_sha256": accepted.model_sha256 or None,
        "model_revision": accepted.model_revision or None,
        "engine": accepted.engine,
        "sampling": {name: getattr(params, name) for name in SAMPLING},
        "constrained": bool(params.grammar),
        "queue_s": round(accepted.queued_s, 4),
    }
    if done is not None:
        out.update(
            prompt_tokens=done.prompt_tokens,
            tokens=done.tokens,
            ttft_s=round(done.ttft_s, 4),
            # the tokens after the first over their time, as llama.cpp's eval rate
            tokens_per_s=round((done.tokens - 1) / done.decode_s, 2) if done.decode_s > 0 else None,
            stop_reason=done.stop_reason,
        )
    return out


def header(values: dict[str, Any]) -> str:
    """A receipt as one HTTP header value: compact JSON, ASCII only."""
    return json.dumps(values, separators=(",", ":"), ensure_ascii=True)


def lines(values: dict[str, Any]) -> list[str]:
    """A receipt for people, one ``key: value`` a line."""
    return [
        f"{key}: {json.dumps(value) if isinstance(value, dict) else value}"
        for key, value in values.items()
        if value is not None
    ]
