"""Unit tests for rbee.keeper.link.parse_node (pure parsing: nothing is connected to)."""

from __future__ import annotations

import pytest

from rbee.errors import InvalidRequest
from rbee.keeper.link import parse_node
from rbee.paths import DEFAULT_HIVE_PORT


@pytest.fixture(autouse=True)
def default_port(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("RBEE_HIVE_PORT", "4567")
    return 4567


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ("host", ("host", 4567)),
        ("host:1234", ("host", 1234)),
        ("gpu-box.local:7830", ("gpu-box.local", 7830)),
        ("10.0.0.5", ("10.0.0.5", 4567)),
        ("10.0.0.5:1", ("10.0.0.5", 1)),
        ("h:65535", ("h", 65535)),
        ("[::1]:99", ("::1", 99)),
        ("[::1]", ("::1", 4567)),
        ("[fe80::1%eth0]:8080", ("fe80::1%eth0", 8080)),
        ("::1", ("::1", 4567)),  # a bare IPv6 address has no port
    ],
)
def test_parse_node(node: str, expected: tuple[str, int]) -> None:
    assert parse_node(node) == expected


def test_default_port_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_HIVE_PORT", "9999")
    assert parse_node("host") == ("host", 9999)
    assert parse_node("[::1]") == ("::1", 9999)
    assert parse_node("host:1234") == ("host", 1234)  # an explicit port wins
    monkeypatch.delenv("RBEE_HIVE_PORT")
    assert parse_node("host") == ("host", DEFAULT_HIVE_PORT)


@pytest.mark.parametrize(
    "node", ["h:0", "h:70000", "h:65536", "h:x", "h:", "h:-1", "h: 80", "h:8o", "[::1]:", "[::1]:x"]
)
def test_bad_port(node: str) -> None:
    with pytest.raises(InvalidRequest, match="has an invalid port") as exc:
        parse_node(node)
    assert repr(node) in exc.value.message
    assert exc.value.suggestion == "use HOST[:PORT]"


@pytest.mark.parametrize("node", ["", ":80", "[]", "[]:80"])
def test_empty_host(node: str) -> None:
    with pytest.raises(InvalidRequest, match="names no host"):
        parse_node(node)


@pytest.mark.parametrize("node", ["h:²", "h:8³"])
def test_superscript_digit_port_is_invalid_request(node: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_node(node)


@pytest.mark.parametrize("node", ["[::1]junk", "[::1]99", "[::1"])
def test_garbage_around_brackets_is_invalid(node: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_node(node)


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_bad_default_port_from_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RBEE_HIVE_PORT", value)
    with pytest.raises(InvalidRequest):
        parse_node("host")
