"""The gateway's pure parts: OpenAI request parsing, response shapes, error mapping, key rules,
and the HTTP edge in memory (Starlette's test client: no sockets, no hive)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from rbee.errors import (
    AccessDenied,
    AllSlotsBusy,
    HiveDraining,
    HiveUnreachable,
    InvalidRequest,
    ModelNotFound,
    WorkerCrashed,
)
from rbee.gateway.app import Gateway, GatewayConfig
from rbee.gateway.auth import key_matches, load_keys
from rbee.gateway.errors import BadParameter, http_error
from rbee.gateway.main import parse_listen, prepare
from rbee.gateway.params import Turn, flatten, parse_call
from rbee.gateway.shapes import DONE_EVENT, Shaper
from rbee.protocol.messages import MAX_TOKENS_LIMIT, Done
from rbee.transport.sockets import is_loopback

KEY = "k" * 20
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat(**fields: Any) -> dict[str, Any]:
    return {**CHAT, **fields}


# ------------------------------------------------------------------ request parsing


def test_chat_maps_onto_generate_params() -> None:
    call = parse_call(
        "chat",
        chat(
            max_tokens=7,
            temperature=0,
            top_p=0.5,
            seed=3,
            stop="x",
            stream=True,
            stream_options={"include_usage": True},
            user="ignored",
            metadata={"a": "b"},
        ),
        allow_local_models=False,
    )
    p = call.params
    assert (call.kind, call.model, call.stream, call.include_usage) == ("chat", "m", True, True)
    assert (p.prompt, p.raw, p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (
        "hi",
        False,
        7,
        0.0,
        0.5,
        3,
        ["x"],
    )


def test_defaults_follow_openai() -> None:
    chat_call = parse_call("chat", CHAT, allow_local_models=False)
    assert chat_call.params.max_tokens == MAX_TOKENS_LIMIT  # until the context ends, like OpenAI
    assert (chat_call.params.temperature, chat_call.params.top_p, chat_call.params.seed) == (
        1.0,
        1.0,
        -1,
    )
    done = parse_call("completion", {"model": "m", "prompt": ["once"]}, allow_local_models=False)
    assert (done.params.prompt, done.params.raw, done.params.max_tokens) == ("once", True, 16)


def test_max_completion_tokens_wins_and_extensions_pass() -> None:
    call = parse_call(
        "chat",
        chat(max_tokens=5, max_completion_tokens=9, top_k=3, ignore_eos=True),
        allow_local_models=False,
    )
    assert (call.params.max_tokens, call.params.top_k, call.params.ignore_eos) == (9, 3, True)
    assert call.params.cache_prompt  # llama-server's default
    fresh = parse_call("chat", chat(cache_prompt=False), allow_local_models=False)
    assert not fresh.params.cache_prompt
    with pytest.raises(InvalidRequest, match="cache_prompt must be true or false"):
        parse_call("chat", chat(cache_prompt="no"), allow_local_models=False)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 3}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": 3}},
            "response_format.json_schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
            "response_format.json_schema.schema",
        ),
        ({"grammar": 5}, "grammar"),
        ({"grammar": "root ::= x", "json_schema": {}}, "grammar"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"seed": 2**40}, "seed"),
        ({"stop": [1]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
    ],
)
def test_unsupported_or_bad_fields_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadParameter) as caught:
        parse_call("chat", chat(**fields), allow_local_models=False)
    assert caught.value.param == param
    assert caught.value.code == "INVALID_REQUEST"


def test_completion_prompt_forms() -> None:
    for prompt in ([1, 2], ["a", "b"], "", None):
        with pytest.raises(BadParameter) as caught:
            parse_call("completion", {"model": "m", "prompt": prompt}, allow_local_models=True)
        assert caught.value.param == "prompt"
    with pytest.raises(BadParameter):
        parse_call(
            "completion", {"model": "m", "prompt": "x", "echo": True}, allow_local_models=True
        )


def test_local_model_references_only_on_loopback() -> None:
    for model in ("file:/etc/passwd", "synthetic:50"):
        with pytest.raises(BadParameter) as caught:
            parse_call("chat", chat(model=model), allow_local_models=False)
        assert caught.value.param == "model"
        assert parse_call("chat", chat(model=model), allow_local_models=True).model == model


def test_chat_messages_and_text_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    call = parse_call(
        "chat", chat(messages=[{"role": "user", "content": parts}]), allow_local_models=False
    )
    assert call.params.prompt == "ab"
    turns = [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello")]
    assert flatten(turns) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello"
    assert flatten([Turn("user", "just this")]) == "just this"
    developer = {"role": "developer", "content": "rules"}
    call = parse_call(
        "chat", chat(messages=[developer, *CHAT["messages"]]), allow_local_models=False
    )
    assert call.params.prompt == "System: rules\n\nUser: hi"


# ------------------------------------------------------------------ response shapes


def done(reason: str = "eos") -> Done:
    return Done(
        job_id="j-1", seq=3, tokens=3, prompt_tokens=5, ttft_s=0.1, decode_s=0.2, stop_reason=reason
    )


def events(data: bytes) -> list[Any]:
    assert data.endswith(b"\n\n")
    out = []
    for event in data.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), event
        body = event.removeprefix(b"data: ")
        out.append(body.decode() if body == b"[DONE]" else json.loads(body))
    return out


def test_chat_stream_chunks() -> None:
    shaper = Shaper("chat", "m", "chatcmpl-1", include_usage=True)
    opening, delta = events(shaper.opening())[0], events(shaper.delta("Hé"))[0]
    assert opening["object"] == "chat.completion.chunk" and opening["usage"] is None
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert delta["choices"][0]["delta"] == {"content": "Hé"}
    assert b'"H\xc3\xa9"' in shaper.delta("Hé")  # UTF-8 as is, compact JSON
    last, usage, end = events(shaper.closing(done("length")))
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert end == "[DONE]" and shaper.closing(done()).endswith(DONE_EVENT)


def test_completion_shapes() -> None:
    shaper = Shaper("completion", "m", "cmpl-1")
    assert shaper.opening() == b""
    chunk = events(shaper.delta("x"))[0]
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "x"
    assert "usage" not in chunk  # only with stream_options.include_usage
    last, end = events(shaper.closing(done("stop")))
    assert last["choices"][0]["finish_reason"] == "stop" and end == "[DONE]"
    whole = shaper.response("abc", done(), {"node": "n"})
    assert whole["choices"][0]["text"] == "abc" and whole["usage"]["total_tokens"] == 8
    assert whole["rbee"] == {"node": "n"}


# ------------------------------------------------------------------ errors


def test_error_statuses_and_retry_after() -> None:
    status, body, headers = http_error(ModelNotFound("no model x"))
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        404,
        "MODEL_NOT_FOUND",
        "model",
    )
    status, body, headers = http_error(AllSlotsBusy("busy", retry_after_s=2.5))
    assert (status, headers["Retry-After"], body["error"]["type"]) == (429, "3", "rate_limit_error")
    assert http_error(HiveDraining("bye"))[0] == 503
    assert http_error(HiveUnreachable("gone"))[2] == {"Retry-After": "1"}
    assert http_error(WorkerCrashed("boom"))[0] == 500
    assert http_error(InvalidRequest("bad", suggestion="do x"))[1]["error"]["message"] == (
        "bad (hint: do x)"
    )


# ------------------------------------------------------------------ keys and listening


def test_loopback_rule() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.4", "example.org"]))


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# gateway keys\n{KEY}\n\n  {'b' * 16}  \n")
    path.chmod(0o600)
    keys = load_keys(str(path), {"RBEE_API_KEYS": f"{'c' * 16}, {KEY}"})
    assert keys == ("c" * 16, KEY, "b" * 16)
    assert key_matches(KEY, keys) and not key_matches(KEY[:-1], keys) and not key_matches("", keys)
    with pytest.raises(InvalidRequest):
        load_keys(None, {"RBEE_API_KEYS": "short"})
    with pytest.raises(InvalidRequest):
        load_keys(str(tmp_path / "absent"), {})


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_keys_file_others_can_open_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    with pytest.raises(AccessDenied) as caught:
        load_keys(str(path), {})
    assert "chmod 600" in caught.value.suggestion and KEY not in str(caught.value)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:7833") == ("127.0.0.1", 7833)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("localhost") == ("localhost", 7833)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("", ":80", "1.2.3.4:99999", "::1:80", "a:b"):
        with pytest.raises(InvalidRequest):
            parse_listen(bad)


def test_no_open_gateway_on_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEE_API_KEYS", raising=False)
    with pytest.raises(InvalidRequest) as caught:
        prepare("0.0.0.0:0")  # refused before anything is bound
    assert "without API keys" in caught.value.message
    loose = tmp_path / "keys"
    loose.write_text(KEY)
    os.chmod(loose, 0o644)
    with pytest.raises(AccessDenied):
        prepare("0.0.0.0:0", api_keys_file=str(loose))


# ------------------------------------------------------------------ the HTTP edge, in memory


def test_bearer_keys_are_required_when_configured() -> None:
    gateway = Gateway(GatewayConfig(api_keys=(KEY,)))
    try:
        client = TestClient(gateway.app())
        assert client.get("/health").status_code == 200  # liveness needs no key
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-wrong-key"},
            {"Authorization": f"Basic {KEY}"},
        ):
            refused = client.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "ACCESS_DENIED"
            assert KEY not in refused.text and "wrong-key" not in refused.text
        ok = {"Authorization": f"Bearer {KEY}"}
        bad = client.post("/v1/chat/completions", json=chat(n=3), headers=ok)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    finally:
        gateway.ctx.destroy(linger=0)


def test_malformed_bodies_and_unknown_routes() -> None:
    gateway = Gateway(GatewayConfig())
    try:
        client = TestClient(gateway.app())
        broken = client.post("/v1/completions", content=b"{not json")
        assert broken.status_code == 400 and broken.json()["error"]["type"] == (
            "invalid_request_error"
        )
        assert client.post("/v1/completions", json=[1]).status_code == 400
        missing = client.get("/v1/nothing")
        assert missing.status_code == 404 and "error" in missing.json()
        assert client.get("/v1/chat/completions").status_code == 405
    finally:
        gateway.ctx.destroy(linger=0)


def test_a_keyless_client_socket_off_loopback_is_refused_before_it_connects() -> None:
    import zmq

    from rbee.errors import AccessDenied
    from rbee.transport.sockets import DealerClient, StreamSubscriber, endpoint_host

    assert endpoint_host("tcp://10.0.0.2:7830") == "10.0.0.2"
    assert endpoint_host("tcp://[::1]:7830") == "::1"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with pytest.raises(AccessDenied, match="never sends a request in clear"):
            DealerClient(ctx, "tcp://10.0.0.2:7830")
        with pytest.raises(AccessDenied):
            StreamSubscriber(ctx, "tcp://[fd00::2]:7831", 10)
        DealerClient(ctx, "tcp://127.0.0.1:7830").close()  # development mode stays plain
        DealerClient(ctx, "tcp://10.0.0.2:7832", plaintext_ok=True).close()  # pairing
    finally:
        ctx.destroy(linger=0)
