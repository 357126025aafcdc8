"""Ollama's API on the gateway's port: what tools built for Ollama ask of it.

VS Code's Ollama provider needs ``/api/version``, ``/api/tags``, ``/api/show`` and ``/api/chat``;
Open WebUI's Ollama connection and the official clients also use ``/api/generate`` and
``/api/ps``. Same process, routing and API keys as the OpenAI routes: a request becomes the same
rbee job (its body is translated into the OpenAI body the gateway already validates, and a bad
field is named as Ollama calls it).

Answers stream as NDJSON, one JSON object a line, unless ``"stream": false``; the last object
has ``done: true``, ``done_reason`` and Ollama's counts and durations (nanoseconds). Errors are
Ollama's: ``{"error": "…"}`` with the HTTP status. ``format`` (``"json"`` or a JSON schema)
becomes a grammar the output follows (rbee.grammar); ``tools`` are offered as on the OpenAI
routes (rbee.gateway.tools) and calls come back in Ollama's shape; ``/api/embed`` and
``/api/embeddings`` are embedding jobs (rbee.gateway.embeddings); ``/api/pull`` and
``/api/delete`` manage models (rbee.gateway.ollama_models). ``options.num_ctx`` picks (or
loads) a worker whose slots hold that much context; ``logprobs``/``top_logprobs`` are answered
in Ollama's shape (rbee.gateway.ollama_probs). Not here: images, ``suffix``,
``template``; a request that uses them gets a 400 naming the field rather than an answer that
quietly ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rbee.errors import RbeeError
from rbee.gateway import embeddings, ollama_models, ollama_probs
from rbee.gateway.errors import BadParameter, ollama_error
from rbee.gateway.http import NDJSON, collect, ndjson_line, opening, read_json
from rbee.gateway.jobs import Job
from rbee.gateway.listing import list_models
from rbee.gateway.params import CHAT_MAX_TOKENS_DEFAULT, Kind, model_name, parse_call
from rbee.gateway.tools import ToolStream, split_calls
from rbee.keeper.job import Failed, Finished, JobEvent, Text
from rbee.protocol.messages import MAX_CTX_TOKENS, Done, GenerateParams, TokenProb

if TYPE_CHECKING:
    from rbee.gateway.app import Gateway

OLLAMA_VERSION = "0.12.0"  # the Ollama API whose shapes these are (clients check a minimum)
OPTIONS = {  # Ollama's options → the OpenAI fields the gateway validates
    "temperature": "temperature",
    "num_predict": "max_tokens",
    "top_k": "top_k",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}
DURATION = re.compile(r"-?(\d+(\.\d+)?(ms|s|m|h))+|-?\d+(\.\d+)?")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
REFUSED = ("images", "suffix", "template")
DONE_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "canceled": "stop"}


def routes(gateway: Gateway) -> list[Route]:
    """The /api/* routes, served by ``gateway``'s jobs."""
    api = OllamaApi(gateway)
    return [
        Route("/api/version", api.version, methods=["GET"]),
        Route("/api/tags", api.tags, methods=["GET"]),
        Route("/api/ps", api.ps, methods=["GET"]),
        Route("/api/show", api.show, methods=["POST"]),
        Route("/api/chat", api.chat, methods=["POST"]),
        Route("/api/generate", api.generate, methods=["POST"]),
        Route("/api/embed", api.embed, methods=["POST"]),
        Route("/api/embeddings", api.embeddings, methods=["POST"]),
        *ollama_models.routes(gateway),
    ]


def translate(kind: Kind, body: Any) -> dict[str, Any]:
    """An Ollama /api/chat or /api/generate body as the OpenAI body ``parse_call`` checks."""
    if not isinstance(body, dict):
        raise BadParameter(None, "the request body must be a JSON object")
    for name in REFUSED:
        if body.get(name):
            raise BadParameter(name, f"{name} is not supported by rbee yet")
    options = body.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise BadParameter("options", "options must be an object")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadParameter("stream", "stream must be true or false")
    out: dict[str, Any] = {"model": body.get("model"), "stream": stream}
    for name, value in options.items():  # num_ctx: num_ctx(); others (num_thread …): nothing
        if name in OPTIONS:
            out[OPTIONS[name]] = value
    if out.get("max_tokens") in (-1, -2):  # Ollama: until the model stops, or the context fills
        del out["max_tokens"]
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise BadParameter("format", 'format must be "json" or a JSON schema')
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadParameter("messages", "messages must be a list")
        out["messages"] = [_message(m) for m in messages]
        if body.get("tools"):
            out["tools"] = body["tools"]
    else:
        prompt, system = body.get("prompt", ""), body.get("system")
        if body.get("raw"):
            out["prompt"] = prompt
        else:  # the model's template applies, as Ollama's does, with the system prompt first
            turns = [{"role": "system", "content": system}] if system else []
            out["messages"] = [*turns, {"role": "user", "content": prompt}]
    return out


def _message(m: Any) -> Any:
    """An Ollama chat message as OpenAI's: its calls' arguments are objects (the gateway takes
    both), a tool's answer names the tool rather than the call."""
    if not isinstance(m, dict):
        return m
    out = {"role": m.get("role"), "content": m.get("content", "")}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    if m.get("tool_name") or m.get("name"):
        out["tool_call_id"] = m.get("tool_name") or m.get("name")
    return out


def named_for_ollama(exc: BadParameter) -> BadParameter:
    """The gateway's message about an OpenAI field, naming the Ollama field it came from."""
    param = exc.param or ""
    if param.startswith("response_format"):
        return BadParameter("format", exc.message.replace(param, "format", 1))
    ollama = {v: f"options.{k}" for k, v in OPTIONS.items()}.get(param)
    if ollama is None:
        return exc
    return BadParameter(ollama, exc.message.replace(str(exc.param), ollama, 1))


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _timings(done: Done, started: float) -> dict[str, Any]:
    """Ollama's final counts and durations (nanoseconds) from the worker's totals."""
    return {
        "done_reason": DONE_REASONS.get(done.stop_reason, "stop"),
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": done.prompt_tokens,
        "prompt_eval_duration": int(done.ttft_s * 1e9),
        "eval_count": done.tokens,
        "eval_duration": int(done.decode_s * 1e9),
    }


def _parameter_size(count: int) -> str:
    """Ollama's ``parameter_size``: 134.52M, 7.6B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


def _details(node: dict[str, Any]) -> dict[str, Any]:
    arch = node.get("architecture") or ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else [],
        "parameter_size": _parameter_size(int(node.get("parameters") or 0)),
        "quantization_level": node.get("quantization") or "",
    }


def _model(name: str, where: dict[str, Any]) -> dict[str, Any]:
    """One model as /api/tags and /api/ps list it, from where a hive holds it."""
    return {
        "name": name,
        "model": name,
        "size": where.get("size_bytes", 0),
        "digest": "",
        "details": _details(where),
    }


class OllamaApi:
    """The handlers, over the gateway's job machinery."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def version(self, request: Request) -> Response:
        """GET /api/version."""
        return JSONResponse({"version": OLLAMA_VERSION})

    async def _listing(self) -> list[dict[str, Any]]:
        ctx, node = self.gateway.ctx, self.gateway.config.node
        listing = await anyio.to_thread.run_sync(list_models, ctx, node)
        entries: list[dict[str, Any]] = listing["data"]
        return entries

    async def tags(self, request: Request) -> Response:
        """GET /api/tags: every model of every hive in reach."""
        try:
            entries = await self._listing()
        except RbeeError as exc:
            return ollama_error(exc)
        models = [
            {**_model(entry["id"], entry["rbee"]["nodes"][0]), "modified_at": _now()}
            for entry in entries
        ]
        return JSONResponse({"models": models})

    async def ps(self, request: Request) -> Response:
        """GET /api/ps: the models a worker holds now, one entry per loaded worker (a model
        loaded with two contexts is listed twice), each with its ``context_length``."""
        try:
            entries = await self._listing()
        except RbeeError as exc:
            return ollama_error(exc)
        loaded = [
            {
                **_model(entry["id"], where),
                "expires_at": _now(),
                "size_vram": 0,
                "context_length": worker.get("n_ctx", 0),
            }
            for entry in entries
            for where in entry["rbee"]["nodes"]
            for worker in where.get("workers", [])
            if worker.get("state") in ("idle", "busy")
        ]
        return JSONResponse({"models": loaded})

    async def show(self, request: Request) -> Response:
        """POST /api/show: one model's details (404 as Ollama's when no hive holds it)."""
        try:
            body = await read_json(request)
            name = ollama_models.model_name(body)
            entries = await self._listing()
        except RbeeError as exc:
            return ollama_error(exc)
        entry = next((e for e in entries if e["id"] == name), None)
        if entry is None:
            return JSONResponse({"error": f"model '{name}' not found"}, 404)
        where = entry["rbee"]["nodes"][0]
        arch = where.get("architecture") or "llama"
        info = {
            "general.architecture": arch,
            "general.parameter_count": where.get("parameters", 0),
            f"{arch}.context_length": where.get("context_length", 0),
        }
        details = _details(where)
        return JSONResponse(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": details,
                "model_info": info,
                "capabilities": ["completion", *(["tools"] if where.get("tools") else [])],
                "modified_at": _now(),
            }
        )

    async def chat(self, request: Request) -> Response:
        """POST /api/chat."""
        return await self._answer(request, "chat")

    async def generate(self, request: Request) -> Response:
        """POST /api/generate."""
        return await self._answer(request, "completion")

    async def embed(self, request: Request) -> Response:
        """POST /api/embed: unit vectors, one per input."""
        return await self._embed(request, "input")

    async def embeddings(self, request: Request) -> Response:
        """POST /api/embeddings (Ollama's older endpoint): one prompt, its raw vector."""
        return await self._embed(request, "prompt")

    async def _embed(self, request: Request, field: str) -> Response:
        started = time.perf_counter()
        gateway = self.gateway
        try:
            body = await read_json(request)
            if isinstance(body, dict) and body.get(field) in ("", []):  # Ollama: no vectors
                return JSONResponse({"embedding": []} if field == "prompt" else _no_vectors(body))
            call = embeddings.parse(
                body, allow_local_models=gateway.config.allow_local_models, field=field
            )
            keep_alive = _keep_alive(body, gateway.config.worker_keep_alive_s)
            result = await embeddings.embed(gateway, request, call, keep_alive)
        except RbeeError as exc:
            return ollama_error(exc)
        if isinstance(result, Failed):
            return ollama_error(result.error)
        if field == "prompt":
            return JSONResponse({"embedding": result.vectors[0].tolist()})
        return JSONResponse(
            {
                "model": call.model,
                "embeddings": [embeddings.normalized(v).tolist() for v in result.vectors],
                "total_duration": int((time.perf_counter() - started) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": result.done.prompt_tokens,
            }
        )

    async def _answer(self, request: Request, route: Kind) -> Response:
        started = time.perf_counter()
        gateway = self.gateway
        try:
            body = await read_json(request)
            if _loads_only(route, body):
                return await self._load(request, route, body, started)
            translated = translate(route, body)
            kind: Kind = "chat" if "messages" in translated else "completion"
            if kind == "completion" and translated.get("max_tokens") is None:
                translated["max_tokens"] = CHAT_MAX_TOKENS_DEFAULT  # no 16-token default here
            try:
                call = parse_call(
                    kind, translated, allow_local_models=gateway.config.allow_local_models
                )
            except BadParameter as exc:
                raise named_for_ollama(exc) from None
            keep_alive = _keep_alive(body, gateway.config.worker_keep_alive_s)
            params = dataclasses.replace(call.params, logprobs=ollama_probs.requested(body))
            job = gateway.start(call.model, params, keep_alive, num_ctx(body))
        except RbeeError as exc:
            return ollama_error(exc)
        shape = _Shape(route, call.model, started, call.tools.names if call.tools else None)
        shape.logprobs = params.logprobs >= 0
        try:
            if call.stream:
                return await self._stream(job, shape)
            return await self._whole(request, job, shape)
        except BaseException:
            job.cancel()
            raise

    async def _load(
        self, request: Request, route: Kind, body: dict[str, Any], started: float
    ) -> Response:
        """Ollama's way to load a model (``keep_alive`` 0: to unload it): a request with no
        prompt. One token of a one-token prompt gets a worker holding the model, kept as the
        request's ``keep_alive`` says; the answer says ``load`` or ``unload``."""
        gateway = self.gateway
        model = model_name(body, gateway.config.allow_local_models)
        keep_alive = _keep_alive(body, gateway.config.worker_keep_alive_s)
        params = GenerateParams(prompt=" ", raw=True, max_tokens=1, temperature=0.0)
        job = gateway.start(model, params, keep_alive, num_ctx(body))
        try:
            _, end = await collect(request, job, gateway.config.keepalive_s)
        except BaseException:
            job.cancel()
            raise
        if isinstance(end, Failed):
            return ollama_error(end.error)
        shape = _Shape(route, model, started, None)
        answer = shape.last("", end.done)
        answer.update(done_reason="unload" if keep_alive == 0 else "load", eval_count=0)
        return JSONResponse(answer)

    async def _whole(self, request: Request, job: Job, shape: _Shape) -> Response:
        """The whole answer in one object."""
        probs: list[TokenProb] = []
        text, end = await collect(request, job, self.gateway.config.keepalive_s, probs)
        if isinstance(end, Failed):
            return ollama_error(end.error)
        if shape.tools:
            text, calls = split_calls(text, shape.tools)
            return JSONResponse(shape.last(text, end.done, calls, probs))
        return JSONResponse(shape.last(text, end.done, probs=probs))

    async def _stream(self, job: Job, shape: _Shape) -> Response:
        """Stream once the job has started: Ollama answers an unknown model with a 404, not
        with a stream."""
        first = await opening(job, self.gateway.config.keepalive_s)
        if isinstance(first, Failed):
            job.cancel()
            return ollama_error(first.error)
        return StreamingResponse(self._lines(job, shape, list(first)), media_type=NDJSON)

    async def _lines(self, job: Job, shape: _Shape, first: list[JobEvent]) -> AsyncIterator[bytes]:
        """NDJSON lines; with tools, text that may be a call is held to the end (as the OpenAI
        stream holds it), and the calls go out in one line before the last. Each line carries
        the log probabilities of the tokens it releases (held text holds them too)."""
        held = ToolStream(shape.tools) if shape.tools else None
        probs: list[TokenProb] = []
        try:
            while True:
                event = first.pop(0) if first else await job.next(self.gateway.config.keepalive_s)
                if isinstance(event, Text):
                    probs.extend(event.probs)
                if isinstance(event, Text) and (
                    text := held.feed(event.text) if held else event.text
                ):
                    yield ndjson_line(shape.piece(text, probs=probs))
                    probs = []
                elif isinstance(event, Finished):
                    rest, calls = held.end() if held else ("", [])
                    if rest or calls:
                        yield ndjson_line(shape.piece(rest, calls, probs))
                        probs = []
                    yield ndjson_line(shape.last("", event.done, probs=probs))
                    return
                elif isinstance(event, Failed):
                    yield ndjson_line({"error": event.error.message})
                    return
        finally:
            job.cancel()


class _Shape:
    """The objects of one answer: chat's ``message`` or generate's ``response``."""

    def __init__(self, route: Kind, model: str, started: float, tools: set[str] | None) -> None:
        self.route, self.model, self.started = route, model, started
        self.tools = tools  # the names of the tools offered: calls are read from the text
        self.logprobs = False  # asked for: objects with tokens carry their ``logprobs``

    def _text(self, text: str, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
        if self.route != "chat":
            return {"response": text}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:  # Ollama's calls carry the arguments as an object, and no id
            message["tool_calls"] = [
                {"function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                for c in calls
            ]
        return {"message": message}

    def _probs(self, probs: Sequence[TokenProb]) -> dict[str, Any]:
        return {"logprobs": ollama_probs.entries(probs)} if self.logprobs and probs else {}

    def piece(
        self,
        text: str,
        calls: list[dict[str, Any]] | None = None,
        probs: Sequence[TokenProb] = (),
    ) -> dict[str, Any]:
        head = {"model": self.model, "created_at": _now()}
        return {**head, **self._text(text, calls), **self._probs(probs), "done": False}

    def last(
        self,
        text: str,
        done: Done,
        calls: list[dict[str, Any]] | None = None,
        probs: Sequence[TokenProb] = (),
    ) -> dict[str, Any]:
        head = {"model": self.model, "created_at": _now(), **self._text(text, calls), "done": True}
        return {**head, **self._probs(probs), **_timings(done, self.started)}


def _arguments(call: dict[str, Any]) -> Any:
    try:
        return json.loads(call["function"]["arguments"])
    except ValueError:
        return call["function"]["arguments"]


def _loads_only(route: Kind, body: Any) -> bool:
    """Whether a chat or generate body asks for nothing but the model (Ollama then loads it)."""
    if not isinstance(body, dict):
        return False
    if route == "chat":
        return body.get("messages") in (None, [])
    return not body.get("prompt") and not body.get("suffix") and not body.get("images")


def num_ctx(body: Any) -> int:
    """Ollama's ``options.num_ctx``: the tokens of context the request's worker must hold (0:
    none asked, the model's default). The hive cuts a value over the model's trained context
    to that, as Ollama does, and never hands the job to a worker loaded with less."""
    options = body.get("options") if isinstance(body, dict) else None
    value = options.get("num_ctx") if isinstance(options, dict) else None
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadParameter("options.num_ctx", "options.num_ctx must be an integer")
    if not 1 <= value <= MAX_CTX_TOKENS:
        raise BadParameter(
            "options.num_ctx", f"options.num_ctx must be between 1 and {MAX_CTX_TOKENS}"
        )
    return value


def _no_vectors(body: dict[str, Any]) -> dict[str, Any]:
    return {"model": body.get("model", ""), "embeddings": []}


def _keep_alive(body: Any, default: float) -> float:
    """Ollama's ``keep_alive``: seconds, or a Go duration such as ``5m`` or ``1h30m``;
    negative: keep it loaded for good (rbee's -1)."""
    value = body.get("keep_alive") if isinstance(body, dict) else None
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and DURATION.fullmatch(value.strip()):
        parts = DURATION_PART.findall(value.strip())
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
        seconds = -seconds if value.strip().startswith("-") else seconds
    else:
        raise BadParameter("keep_alive", "keep_alive must be seconds or a duration such as 5m")
    return -1.0 if seconds < 0 else seconds
