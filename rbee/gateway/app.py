"""The HTTP routes: OpenAI's endpoints over rbee jobs.

A streaming request is answered with an HTTP error (404, 400, 429 …) when the job fails before
it starts, as OpenAI does; the status is committed to 200 once a worker takes the job or the
keep-alive interval passes without an answer (a model downloading or loading). From then on a
wait is filled with keep-alive comments, so clients with read timeouts keep listening, and a late
failure arrives as an ``error`` event, which the OpenAI clients raise.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio.to_thread
import zmq
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rbee import __version__, log
from rbee.errors import InternalError, RbeeError
from rbee.gateway import embeddings, metrics, ollama
from rbee.gateway.auth import BearerAuth
from rbee.gateway.errors import error_body, http_error
from rbee.gateway.http import collect, opening, read_json
from rbee.gateway.jobs import READY_TIMEOUT_S, Job, Jobs
from rbee.gateway.listing import list_models
from rbee.gateway.params import Kind, parse_call
from rbee.gateway.shapes import KEEP_ALIVE_EVENT, Shaper, sse
from rbee.gateway.tools import ToolStream, split_calls
from rbee.keeper import receipt as receipts
from rbee.keeper.job import Failed, Finished, InferRequest, Started, Text
from rbee.protocol.messages import KEEP_ALIVE_DEFAULT, PROTOCOL_VERSION, GenerateParams, TokenProb

KEEPALIVE_INTERVAL_S = 5.0  # well under the read timeouts of HTTP clients and proxies (≥ 30 s)
RECEIPT_HEADER = "X-Rbee-Receipt"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

logger = log.get(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway serves; ``main`` fills it from the command line."""

    node: str | None = None  # pin every request to this hive (HOST[:PORT] or node name)
    api_keys: tuple[str, ...] = ()
    allow_local_models: bool = True  # file: and synthetic: references (loopback binds only)
    keepalive_s: float = KEEPALIVE_INTERVAL_S
    ready_timeout_s: float = READY_TIMEOUT_S
    worker_keep_alive_s: float = KEEP_ALIVE_DEFAULT
    backend: str = "auto"  # where workers for its requests run (`rbee serve --backend`)
    device: str = ""  # the GPU for backend cuda ("": the one with most free memory)


def error_response(exc: RbeeError) -> JSONResponse:
    """An rbee error as OpenAI's error body with the fitting status."""
    status, body, headers = http_error(exc)
    return JSONResponse(body, status, headers)


class Gateway:
    """The routes and what they share: one zmq.Context and the jobs in flight."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.jobs = Jobs(self.ctx, config.ready_timeout_s)

    def app(self) -> Starlette:
        """The ASGI application."""
        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completion, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                metrics.route(self),
                *ollama.routes(self),
            ],
            middleware=[Middleware(BearerAuth, keys=self.config.api_keys)],
            exception_handlers={HTTPException: _http_exception, Exception: _unexpected},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        yield
        left = await anyio.to_thread.run_sync(self.jobs.stop_all)
        if left:
            logger.warning("jobs still running at shutdown", count=left)
        self.ctx.destroy(linger=0)

    # ------------------------------------------------------------------ routes

    async def health(self, request: Request) -> Response:
        """Liveness: the gateway answers (hives are asked by the other routes)."""
        return JSONResponse(
            {"status": "ok", "rbee_version": __version__, "protocol_version": PROTOCOL_VERSION}
        )

    async def models(self, request: Request) -> Response:
        """The models of every hive in reach."""
        try:
            listing = await anyio.to_thread.run_sync(list_models, self.ctx, self.config.node)
        except RbeeError as exc:
            return error_response(exc)
        return JSONResponse(listing)

    async def model(self, request: Request) -> Response:
        """One model of the list, or 404."""
        response = await self.models(request)
        if response.status_code != 200:
            return response
        wanted = request.path_params["model"]
        for entry in json.loads(bytes(response.body))["data"]:
            if entry["id"] == wanted:
                return JSONResponse(entry)
        body = error_body(
            f"no hive in reach holds {wanted}", "invalid_request_error", "MODEL_NOT_FOUND", "model"
        )
        return JSONResponse(body, 404)

    async def chat(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        return await self._complete(request, "chat")

    async def completion(self, request: Request) -> Response:
        """POST /v1/completions."""
        return await self._complete(request, "completion")

    async def embeddings(self, request: Request) -> Response:
        """POST /v1/embeddings."""
        try:
            body = await read_json(request)
            call = embeddings.parse(body, allow_local_models=self.config.allow_local_models)
            encoding = embeddings.encoding_format(body)
            logger.info("request", endpoint="embeddings", model=call.model, inputs=len(call.inputs))
            result = await embeddings.embed(self, request, call)
        except RbeeError as exc:
            return error_response(exc)
        if isinstance(result, Failed):
            return error_response(result.error)
        return JSONResponse(embeddings.openai_response(call, result, encoding))

    # ------------------------------------------------------------------ completions

    async def _complete(self, request: Request, kind: Kind) -> Response:
        try:
            body = await read_json(request)
            call = parse_call(kind, body, allow_local_models=self.config.allow_local_models)
            job = self.start(call.model, call.params)
        except RbeeError as exc:
            return error_response(exc)
        response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + job.job_id.removeprefix("j-")
        asked = call.params.logprobs >= 0
        shaper = Shaper(kind, call.model, response_id, call.include_usage, asked)
        logger.info("request", endpoint=kind, model=call.model, stream=call.stream, job=job.job_id)
        names = call.tools.names if call.tools else None
        try:
            if call.stream:
                return await self._stream(job, shaper, names)
            return await self._whole(request, job, shaper, names)
        except BaseException:
            job.cancel()  # the server is stopping, or a bug: never leave a worker generating
            raise

    def start(
        self,
        model: str,
        params: GenerateParams,
        keep_alive_s: float | None = None,
        n_ctx: int = 0,
    ) -> Job:
        """Start a validated request's job where this gateway sends its work (``keep_alive_s``:
        the request's own, else the gateway's; ``n_ctx``: the context per slot it needs, 0 for
        the model's default)."""
        keep_alive = self.config.worker_keep_alive_s if keep_alive_s is None else keep_alive_s
        config = self.config
        return self.jobs.start(
            InferRequest(
                model, params, config.node, keep_alive, config.backend, config.device, n_ctx
            )
        )

    async def _whole(
        self, request: Request, job: Job, shaper: Shaper, tools: set[str] | None
    ) -> Response:
        """The whole answer at once (``tools``: the names of the tools offered, whose calls are
        read from the text)."""
        probs: list[TokenProb] = []
        text, end = await collect(request, job, self.config.keepalive_s, probs)
        if isinstance(end, Failed):
            return error_response(end.error)
        _log_served(job, end)
        content, calls = split_calls(text, tools) if tools else (text, [])
        body = shaper.response(content, end.done, job.where, calls, probs)
        receipt = job.receipt(end.done)
        if receipt is None:
            return JSONResponse(body)
        body["rbee"] = {**body["rbee"], "receipt": receipt}
        return JSONResponse(body, headers={RECEIPT_HEADER: receipts.header(receipt)})

    async def _stream(self, job: Job, shaper: Shaper, tools: set[str] | None) -> Response:
        """Stream, once the job has started (or answer its failure with an HTTP error)."""
        first = await opening(job, self.config.keepalive_s)
        if isinstance(first, Failed):
            return error_response(first.error)
        held = ToolStream(tools) if tools else None
        receipt = job.receipt()  # what is known now (not yet when a model is still loading)
        headers = (
            {**SSE_HEADERS, RECEIPT_HEADER: receipts.header(receipt)} if receipt else SSE_HEADERS
        )
        return StreamingResponse(
            self._events(job, shaper, first, held),
            media_type="text/event-stream",
            headers=headers,
        )

    async def _events(
        self, job: Job, shaper: Shaper, first: list[Text | Started], held: ToolStream | None
    ) -> AsyncIterator[bytes]:
        """The SSE body. Starlette cancels it when the client disconnects; ``finally`` then
        stops the job, whose thread closes its subscription and sends Cancel. With tools, text
        that may be a call is ``held`` until the end."""

        def delta(event: Text) -> bytes:
            text = held.feed(event.text) if held else event.text
            return shaper.delta(text, event.probs) if text or event.probs else b""

        try:
            if opening := shaper.opening():
                yield opening
            for event in first:
                if isinstance(event, Text) and (chunk := delta(event)):
                    yield chunk
            while True:
                next_event = await job.next(self.config.keepalive_s)
                if next_event is None:
                    yield KEEP_ALIVE_EVENT
                elif isinstance(next_event, Text):
                    if chunk := delta(next_event):
                        yield chunk
                elif isinstance(next_event, Finished):
                    _log_served(job, next_event)
                    content, calls = held.end() if held else ("", [])
                    if content:
                        yield shaper.delta(content)
                    if calls:
                        yield shaper.calls(calls)
                    yield shaper.closing(
                        next_event.done, bool(calls), {"receipt": job.receipt(next_event.done)}
                    )
                    return
                elif isinstance(next_event, Failed):
                    yield sse(http_error(next_event.error)[1])
                    return
        finally:
            job.cancel()


def _log_served(job: Job, event: Finished) -> None:
    done = event.done
    logger.info(
        "served",
        job=job.job_id,
        node=job.where.get("node"),
        worker=job.where.get("worker_id"),
        tokens=done.tokens,
        prompt_tokens=done.prompt_tokens,
        stop=done.stop_reason,
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "NOT_FOUND" if exc.status_code == 404 else None
    body = error_body(
        f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error", code
    )
    return JSONResponse(body, exc.status_code, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("request failed", path=request.url.path)
    body = error_body(f"internal error: {type(exc).__name__}", "server_error", InternalError.code)
    return JSONResponse(body, 500)
