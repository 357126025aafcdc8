"""``GET /metrics``: the Prometheus metrics of every hive in reach, as one exposition.

The hives in reach (the survey `rbee infer` makes, or only the ``--node`` hive) are asked Metrics
over their authenticated ZeroMQ connections, all at once with one deadline. Each answer is
parsed with prometheus_client's own parser and the families are re-exposed together on a fresh
registry (each hive's series already carry its ``node`` label). ``rbee_hive_up{node}`` is 1 for
a hive that answered with its metrics and 0 for one in reach that did not, which is skipped.
The route sits behind the gateway's API keys like every other one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio.to_thread
import zmq
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rbee import log
from rbee.errors import RbeeError
from rbee.gateway.listing import LIST_BROWSE_S
from rbee.keeper.link import open_link
from rbee.keeper.survey import survey
from rbee.protocol.messages import Metrics, MetricsText
from rbee.transport.sockets import DealerClient

if TYPE_CHECKING:
    from rbee.gateway.app import Gateway

METRICS_TIMEOUT_S = 2.0  # every hive answers within this of the first question, or counts as down

Answer = tuple[str, str | None]  # a hive's node name and its metrics text (None: no answer)

logger = log.get(__name__)


def route(gateway: Gateway) -> Route:
    """``GET /metrics`` for the hives ``gateway`` sends its work to."""

    async def metrics(request: Request) -> Response:
        body = await anyio.to_thread.run_sync(pool_metrics, gateway.ctx, gateway.config.node)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"])


def pool_metrics(ctx: zmq.Context[zmq.Socket[bytes]], node: str | None) -> bytes:
    """The exposition for every hive in reach, or only ``node`` (blocking: it asks them)."""
    if node:
        return expose([_ask_node(ctx, node)])
    views = survey(ctx, browse_s=LIST_BROWSE_S, keep=True)
    try:
        asked: list[tuple[str, DealerClient, int]] = []
        answers: list[Answer] = []
        for view in views:
            if view.client is None:  # not paired, silent, another protocol …
                answers.append((view.name, None))
                continue
            try:
                asked.append((view.name, view.client, view.client.send(Metrics())))
            except RbeeError:
                answers.append((view.name, None))
        deadline = time.monotonic() + METRICS_TIMEOUT_S
        answers += [_answer(name, client, rid, deadline) for name, client, rid in asked]
    finally:
        for view in views:
            view.close()
    return expose(answers)


def _ask_node(ctx: zmq.Context[zmq.Socket[bytes]], node: str) -> Answer:
    try:
        link = open_link(ctx, node)
    except RbeeError as exc:
        logger.info("no metrics from a hive", node=node, error=exc.message)
        return node, None
    try:
        rid = link.client.send(Metrics())
        return _answer(link.hello.node, link.client, rid, time.monotonic() + METRICS_TIMEOUT_S)
    finally:
        link.close()


def _answer(name: str, client: DealerClient, rid: int, deadline: float) -> Answer:
    """The reply to request ``rid``, waited for until ``deadline`` (the questions went out
    together, so waiting for each in turn waits for all at once)."""
    try:
        reply = next(client.replies(rid, max(deadline - time.monotonic(), 0.001)))
    except RbeeError as exc:  # silent, or a hive that has no metrics (an older rbee)
        logger.info("no metrics from a hive", node=name, error=exc.message)
        return name, None
    return name, reply.text if isinstance(reply, MetricsText) else None


def expose(answers: Iterable[Answer]) -> bytes:
    """One exposition of the hives' answers, with ``rbee_hive_up``; pure."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge(answers)))
    return generate_latest(registry)


def merge(answers: Iterable[Answer]) -> list[Metric]:
    """The hives' metric families merged by name (a series met twice, as from two hives that
    share a name, is kept once), then ``rbee_hive_up``. A text that does not parse counts as
    no answer."""
    merged: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    up: dict[str, int] = {}
    for node, text in answers:
        families = _parse(node, text) if text is not None else None
        up[node] = max(up.get(node, 0), families is not None)
        for family in families or []:
            into = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            if into.type != family.type:  # two rbee versions that disagree: keep the first
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in seen:
                    seen.add(key)
                    into.samples.append(sample)
    gauge = GaugeMetricFamily(
        "rbee_hive_up",
        "1: the hive answered with its metrics; 0: in reach, but no answer (skipped)",
        labels=["node"],
    )
    for node, value in sorted(up.items()):
        gauge.add_metric([node], value)
    return [*merged.values(), gauge]


def _parse(node: str, text: str) -> list[Metric] | None:
    try:
        return list(text_string_to_metric_families(text))
    except ValueError as exc:
        logger.warning("a hive's metrics do not parse", node=node, error=str(exc)[:200])
        return None


class _Families(Collector):
    """Families already made, handed to a registry for its exposition."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families
