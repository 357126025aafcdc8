"""Ollama's ``/api/pull`` and ``/api/delete`` on the gateway, over rbee's own model catalog.

rbee pulls from Hugging Face, never from Ollama's library: ``/api/pull`` takes
``hf:ORG/REPO[:QUANT|/FILE.gguf][@REV]`` or Ollama's own spelling of a Hub model,
``hf.co/ORG/REPO[:QUANT]`` (or ``huggingface.co/…``), and runs exactly what `rbee models pull`
runs: PullModel to the hive the request would go to, whose download is verified (sha256),
resumable and shared with anyone else pulling the same model. That conversation blocks on
ZeroMQ, so it runs on a thread of its own with its own sockets (sharing only the gateway's
zmq.Context) and hands its frames to the event loop. A client that hangs up stops the thread
within STOP_CHECK_S; the download itself goes on on the hive, for whoever else waits for it.

The hive's Progress frames become Ollama's NDJSON lines. The file's own sha256 is known only
once the hive has verified it, so a pull's ``digest`` is a stable key derived from its
reference: clients draw one progress bar per digest. The last line, ``success``, also names
the model as ``/api/tags`` lists it.

``/api/delete`` has no hive request to call (the hive protocol has no removal frame), so it
removes the model from this machine's catalog, the one a gateway's local hive serves, with
`rbee models rm`'s code and without ``--force``: a model a worker holds is refused, nothing is
deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import zmq
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rbee import log
from rbee.errors import (
    Canceled,
    HiveUnreachable,
    InternalError,
    InvalidRequest,
    ModelInUse,
    ModelNotFound,
    RbeeError,
)
from rbee.gateway.errors import BadParameter, ollama_error
from rbee.gateway.http import NDJSON, cancel_on_disconnect, ndjson_line, read_json
from rbee.hub.refs import HF_PREFIX, is_hub_reference, parse_reference
from rbee.keeper.connect import connect
from rbee.keeper.job import STOP_CHECK_S
from rbee.keeper.link import parse_node
from rbee.keeper.models import PULL_WAIT_S, remove_model
from rbee.protocol.messages import Frame, ModelPulled, Progress, PullModel
from rbee.transport.sockets import DealerClient, is_loopback

if TYPE_CHECKING:
    from rbee.gateway.app import Gateway

PROGRESS_EVERY_S = 0.25  # at most four progress lines a second
HUB_HOSTS = ("hf.co/", "huggingface.co/")  # how Ollama spells a Hugging Face model
DEFAULT_TAG = ":latest"  # Ollama's implied tag: for a Hub model, the preferred quant
HOW_TO_NAME = (
    "rbee pulls GGUF models from Hugging Face: name one as hf:ORG/REPO, hf:ORG/REPO:QUANT "
    "or hf:ORG/REPO/FILE.gguf (each with an optional @REVISION), or hf.co/ORG/REPO[:QUANT]"
)

PullEvent = Progress | ModelPulled | RbeeError

logger = log.get(__name__)


def routes(gateway: Gateway) -> list[Route]:
    """The routes that change the catalog."""
    api = ModelsApi(gateway)
    return [
        Route("/api/pull", api.pull, methods=["POST"]),
        Route("/api/delete", api.delete, methods=["DELETE"]),
    ]


def hub_reference(name: str) -> str:
    """The canonical ``hf:`` reference an Ollama model name means; InvalidRequest (400) for a
    name of Ollama's library (``llama3.2``), which rbee cannot pull. Pure."""
    text = name.strip()
    for host in HUB_HOSTS:
        if text.lower().startswith(host):
            text = HF_PREFIX + text[len(host) :]
    text = text.removesuffix(DEFAULT_TAG)
    if not is_hub_reference(text):
        raise InvalidRequest(f"{name!r} is not a Hugging Face model: {HOW_TO_NAME}")
    try:
        return parse_reference(text).canonical()
    except InvalidRequest as exc:
        raise InvalidRequest(f"{exc.message}; {HOW_TO_NAME}") from None


def model_name(body: Any) -> str:
    """The ``model`` (or older clients' ``name``) of a request body."""
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise BadParameter("model", "model is required")
    return name


class Pull:
    """One /api/pull's conversation with a hive, on a thread of its own: `rbee models pull`'s,
    its frames handed to the event loop. Start it on the loop that reads ``next``."""

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], node: str | None, reference: str
    ) -> None:
        self.ctx, self.node, self.reference = ctx, node, reference
        self.digest = "sha256:" + hashlib.sha256(reference.encode()).hexdigest()
        self.stop = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[PullEvent] = asyncio.Queue()
        threading.Thread(target=self._run, name=f"pull {reference}", daemon=True).start()

    async def next(self, timeout_s: float) -> PullEvent | None:
        """The next frame (or the error that ended the pull); None when none came in time."""
        try:
            return await asyncio.wait_for(self._events.get(), timeout_s)
        except TimeoutError:
            return None

    def _emit(self, event: PullEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody reads any more
            self.stop.set()

    def _run(self) -> None:
        try:
            link = connect(self.ctx, self.node, self.reference, preload=False)
            try:
                rid = link.client.send(PullModel(reference=self.reference))
                for frame in self._replies(link.client, rid):
                    if isinstance(frame, Progress | ModelPulled):
                        self._emit(frame)
                    if isinstance(frame, ModelPulled):
                        return
            except HiveUnreachable as exc:
                raise link.lost(exc) from None
            finally:
                link.close()
        except RbeeError as exc:
            self._emit(exc)
        except Exception as exc:  # a bug must reach the client as an error, not hang it
            logger.exception("pull failed", reference=self.reference)
            self._emit(InternalError.of(exc))

    def _replies(self, client: DealerClient, rid: int) -> Iterator[Frame]:
        """The hive's frames answering ``rid``, each within PULL_WAIT_S of the last (the hive
        reports twice a second), ``stop`` looked at every STOP_CHECK_S (then Canceled, so
        whoever waits hears that the pull ended)."""
        heard = time.monotonic()
        while True:
            if self.stop.is_set():
                raise Canceled(f"the pull of {self.reference} is no longer wanted")
            try:
                frame = next(client.replies(rid, STOP_CHECK_S))
            except HiveUnreachable:
                if time.monotonic() - heard < PULL_WAIT_S:
                    continue
                raise HiveUnreachable(
                    f"no answer from {client.endpoint} within {PULL_WAIT_S:.1f} s"
                ) from None
            heard = time.monotonic()
            yield frame


class ModelsApi:
    """The handlers of /api/pull and /api/delete."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def pull(self, request: Request) -> Response:
        """POST /api/pull: download a Hugging Face model into a hive's catalog."""
        gateway = self.gateway
        try:
            body = await read_json(request)
            reference = hub_reference(model_name(body))
            stream = body.get("stream", True)
            if not isinstance(stream, bool):
                raise BadParameter("stream", "stream must be true or false")
        except RbeeError as exc:
            return ollama_error(exc)
        logger.info("request", endpoint="pull", model=reference, stream=stream)
        pull = Pull(gateway.ctx, gateway.config.node, reference)
        try:
            if not stream:
                return await self._whole(request, pull)
            # A failure that comes at once (no hive, a refused reference) gets an HTTP status.
            first = await pull.next(gateway.config.keepalive_s)
        except BaseException:
            pull.stop.set()
            raise
        if isinstance(first, RbeeError):
            return ollama_error(first)
        return StreamingResponse(self._lines(pull, first), media_type=NDJSON)

    async def _whole(self, request: Request, pull: Pull) -> Response:
        """``"stream": false``: one ``success`` at the end, or the error with its status."""
        watcher = asyncio.ensure_future(cancel_on_disconnect(request, pull.stop.set))
        try:
            while True:
                event = await pull.next(self.gateway.config.keepalive_s)
                if isinstance(event, RbeeError):
                    return ollama_error(event)
                if isinstance(event, ModelPulled):
                    return JSONResponse(_success(event))
        finally:
            watcher.cancel()
            pull.stop.set()

    async def _lines(self, pull: Pull, event: PullEvent | None) -> AsyncIterator[bytes]:
        """The NDJSON body. Starlette cancels it when the client disconnects; ``finally`` then
        stops the pull's thread. A quiet wait repeats the last line, so clients with read
        timeouts keep listening."""
        last: dict[str, Any] = {"status": "pulling manifest"}
        shown_at, complete = 0.0, False
        try:
            yield ndjson_line(last)
            while True:
                if event is None:
                    yield ndjson_line(last)
                elif isinstance(event, RbeeError):
                    yield ndjson_line({"error": event.message})
                    return
                elif isinstance(event, Progress) and event.total:
                    now = time.monotonic()
                    complete = event.done >= event.total
                    if complete or now - shown_at >= PROGRESS_EVERY_S:
                        last, shown_at = _progress(pull, event.done, event.total), now
                        yield ndjson_line(last)
                elif isinstance(event, ModelPulled):
                    if not complete:  # already here, or too small to report: show it whole
                        yield ndjson_line(_progress(pull, event.size_bytes, event.size_bytes))
                    for status in ("verifying sha256 digest", "writing manifest"):
                        yield ndjson_line({"status": status})
                    yield ndjson_line(_success(event))
                    return
                event = await pull.next(self.gateway.config.keepalive_s)
        finally:
            pull.stop.set()

    async def delete(self, request: Request) -> Response:
        """DELETE /api/delete: remove a model from this machine's catalog (its download too).

        Only on a gateway bound to loopback: its API keys have no roles, so on any other
        address every holder of an inference key could delete the models everyone uses. Bound
        to loopback it answers this machine alone, as `rbee models rm` does.
        """
        gateway, node = self.gateway, self.gateway.config.node
        if not gateway.config.allow_local_models:  # exactly when it listens off loopback
            refusal = "deleting models is refused on a gateway reachable from the network"
            return JSONResponse({"error": f"{refusal}: run `rbee models rm NAME` on the hive"}, 403)
        try:
            name = model_name(await read_json(request))
            if node and not is_loopback(parse_node(node)[0]):
                raise InvalidRequest(
                    f"this gateway sends its work to {node}, and rbee deletes models only from "
                    f"this machine's catalog: run `rbee models rm {name}` there"
                )
        except RbeeError as exc:
            return ollama_error(exc)
        try:
            await anyio.to_thread.run_sync(remove_model, name, False, io.StringIO())
        except ModelNotFound:
            return JSONResponse({"error": f"model '{name}' not found"}, 404)
        except ModelInUse as exc:  # nothing was deleted
            return JSONResponse({"error": exc.message}, 409)
        except RbeeError as exc:
            return ollama_error(exc)
        logger.info("model removed", model=name)
        return Response(status_code=200)


def _progress(pull: Pull, done: float, total: float) -> dict[str, Any]:
    return {
        "status": f"pulling {pull.reference}",
        "digest": pull.digest,
        "total": int(total),
        "completed": int(done),
    }


def _success(pulled: ModelPulled) -> dict[str, Any]:
    return {"status": "success", "model": pulled.name}
