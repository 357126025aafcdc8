"""Configuration: one TOML file, overridden by RBEE_* environment variables, overridden by flags.

The file is ``$RBEE_CONFIG`` if set, else ``/etc/rbee/config.toml`` for root (the system hive),
else ``$XDG_CONFIG_HOME/rbee/config.toml`` (``~/.config/rbee/config.toml``). Every setting has
one environment variable; the file's values are exported into the environment of the process
(unless the variable is already set), so the rest of rbee reads one place, flags take their
defaults from it, and `rbee config show` can say where each value came from. An unknown key or a
bad value fails at start with the file, the key and what was expected.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee.errors import InvalidRequest
from rbee.protocol.messages import (
    MAX_SLOTS,
    MAX_STREAM_INTERVAL_MS,
    PLACEMENTS,
    STREAM_INTERVAL_MS,
)


def _port(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError("a port number, 1-65535")
    return str(value)


def _count(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a whole number ≥ 0")
    return str(value)


def _positive(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a whole number ≥ 1")
    return str(value)


def _slots(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SLOTS:
        raise ValueError(f"a whole number 0-{MAX_SLOTS} (0: automatic)")
    return str(value)


def _interval(value: Any) -> str:
    top = MAX_STREAM_INTERVAL_MS
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"a whole number of ms, 0-{MAX_STREAM_INTERVAL_MS}")
    return str(value)


def _any_port(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
        raise ValueError("a port number, 1-65535 (0: any free port)")
    return str(value)


def flag_type(check: Callable[[Any], str]) -> Callable[[str], int]:
    """An argparse ``type`` for a whole-number flag, checked exactly as the file and the
    environment are (``--port 70000`` is refused, not wrapped around to 4464)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip()) if text.strip().lstrip("-").isdigit() else text
            return int(check(value))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {exc}, got {text!r}") from None

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


PORT_FLAG = flag_type(_any_port)
POSITIVE_FLAG = flag_type(_positive)
COUNT_FLAG = flag_type(_count)
SLOTS_FLAG = flag_type(_slots)
INTERVAL_FLAG = flag_type(_interval)


def SIZE_FLAG(text: str) -> str:
    """An argparse ``type`` for a size flag, checked as the file and the environment are."""
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected {exc}") from None
    return text.strip()


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty string")
    return value


def _text_list(value: Any) -> str:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("a list of strings")
    return ",".join(value)


def _seeds(value: Any) -> str:
    """HOST[:PORT] items (``[v6]:PORT`` for IPv6), each port a real one: checked here so that a
    bad seed is named as RBEE_SEEDS (or lan.seeds), not as a flag the user never typed."""
    joined = _text_list(value)
    for item in joined.split(","):
        port: str | None = None
        if item.startswith("["):
            _, closed, rest = item[1:].partition("]")
            port = (
                rest[1:] if closed and rest.startswith(":") else "" if rest or not closed else None
            )
        elif item.count(":") == 1:
            port = item.rpartition(":")[2]
        if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"HOST[:PORT] items with ports 1-65535 (not {item!r})")
    return joined


def _level(value: Any) -> str:
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError('one of "debug", "info", "warning", "error"')
    return str(value)


def _placement(value: Any) -> str:
    if value not in PLACEMENTS:
        raise ValueError(" or ".join(f'"{p}"' for p in PLACEMENTS))
    return str(value)


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``16G``, ``1.5T`` or a number of bytes (binary units, an optional ``iB``/``B``)."""
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = cleaned.rstrip("KMGT"), cleaned[len(cleaned.rstrip("KMGT")) :]
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"a size such as 512M or 16G, not {text!r}") from None
    if not 0 <= value < 1 << 60:
        raise ValueError(f"a size such as 512M or 16G, not {text!r}")
    return int(value)


def _size(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a size such as 512M or 16G (0: no limit)")
    parse_size(value)
    return value


def _bool(value: Any) -> str:
    if not isinstance(value, bool):
        raise ValueError("true or false (in the environment also 1/0, yes/no, on/off)")
    return "1" if value else ""


@dataclass(frozen=True)
class Setting:
    """One configurable value: its place in the file, its variable and how it is checked."""

    section: str
    key: str
    env: str
    check: Callable[[Any], str]
    default: str
    help: str


SETTINGS = (
    Setting(
        "paths", "data_dir", "RBEE_DATA_DIR", _text, "~/.local/share/rbee", "catalog, models, keys"
    ),
    Setting("hive", "host", "RBEE_HIVE_HOST", _text, "127.0.0.1", "address the hive listens on"),
    Setting("hive", "port", "RBEE_HIVE_PORT", _port, "7830", "request port"),
    Setting("hive", "stream_port", "RBEE_STREAM_PORT", _port, "7831", "token stream port"),
    Setting("hive", "node_name", "RBEE_NODE_NAME", _text, "(hostname)", "name shown to keepers"),
    Setting("hive", "max_workers", "RBEE_MAX_WORKERS", _positive, "4", "workers at once"),
    Setting("hive", "max_queue", "RBEE_MAX_QUEUE", _positive, "16", "jobs waiting"),
    Setting("hive", "secure", "RBEE_SECURE", _bool, "false", "CURVE even on loopback"),
    Setting(
        "hive", "lend", "RBEE_LEND", _bool, "true", "lend memory to peer hives' models (hive role)"
    ),
    Setting(
        "hive",
        "memory_limit",
        "RBEE_MEMORY_LIMIT",
        _size,
        "0",
        "the most RAM the hive plans with, its workers' and lenders' included (0: all)",
    ),
    Setting(
        "hive",
        "lender_stall_s",
        "RBEE_LENDER_STALL_S",
        _positive,
        "10",
        "seconds a lender may make no progress while a job runs on memory it lends",
    ),
    Setting(
        "hive",
        "share_rate",
        "RBEE_SHARE_RATE",
        _size,
        "0",
        "the most bytes/s the hive sends model files to peer hives, e.g. 50M (0: no limit)",
    ),
    Setting(
        "hive", "threads", "RBEE_THREADS", _count, "0", "CPU threads per worker (0: physical cores)"
    ),
    Setting(
        "hive",
        "parallel",
        "RBEE_PARALLEL",
        _slots,
        "0",
        "jobs each worker decodes together (0: automatic, up to 4 as memory allows)",
    ),
    Setting(
        "hive",
        "stream_interval_ms",
        "RBEE_STREAM_INTERVAL_MS",
        _interval,
        str(STREAM_INTERVAL_MS),
        "tokens closer together than this go to clients in one frame (0: one per token)",
    ),
    Setting(
        "hive",
        "backend",
        "RBEE_BACKEND",
        _placement,
        "auto",
        "where requests that name no backend run (auto: GPUs first, as the model fits)",
    ),
    Setting(
        "lan",
        "mdns_interfaces",
        "RBEE_MDNS_INTERFACES",
        _text_list,
        "(real interfaces)",
        "where to announce and browse",
    ),
    Setting("lan", "seeds", "RBEE_SEEDS", _seeds, "", "HOST[:PORT] of hives to ask directly"),
    Setting("lan", "cluster", "RBEE_CLUSTER", _text, "default", "the pool this machine is in"),
    Setting("log", "level", "RBEE_LOG_LEVEL", _level, "info", "debug, info, warning, error"),
)


def config_path() -> Path:
    """The configuration file this process reads (it need not exist)."""
    explicit = os.environ.get("RBEE_CONFIG")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/etc/rbee/config.toml")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rbee" / "config.toml"


def read_file(path: Path) -> dict[str, str]:
    """The file's settings as environment values; InvalidRequest naming file, key, expectation."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{path}: not valid TOML ({exc})") from None
    by_place = {(s.section, s.key): s for s in SETTINGS}
    values: dict[str, str] = {}
    problems = []
    for section, table in data.items():
        if not isinstance(table, dict):
            problems.append(f"{section}: expected a [{section}] table")
            continue
        for key, value in table.items():
            setting = by_place.get((section, key))
            if setting is None:
                known = ", ".join(f"{s.section}.{s.key}" for s in SETTINGS)
                problems.append(f"{section}.{key}: unknown setting (known: {known})")
                continue
            try:
                values[setting.env] = setting.check(value)
            except ValueError as exc:
                problems.append(f"{section}.{key}: expected {exc} (got {value!r})")
    if problems:
        raise InvalidRequest(f"{path}: " + "; ".join(problems), suggestion="fix or remove them")
    return values


ENV_TRUE = ("1", "true", "yes", "on")
ENV_FALSE = ("0", "false", "no", "off")


def _from_env(setting: Setting, text: str) -> Any:
    """An environment variable's text as the file would hold it, for the same check."""
    text = text.strip()
    if setting.check in (_port, _count, _positive, _slots, _interval):
        return int(text) if text.isascii() and text.isdigit() else text
    if setting.check is _bool:
        lowered = text.lower()
        return True if lowered in ENV_TRUE else False if lowered in ENV_FALSE else text
    if setting.check in (_text_list, _seeds):
        return [item.strip() for item in text.split(",") if item.strip()]
    if setting.check is _level:
        return text.lower()
    return text


def check_environment() -> None:
    """Check every set RBEE_* variable like a file value and store it normalised (so that
    RBEE_SECURE=0 means off); InvalidRequest naming each bad variable and what was expected."""
    problems = []
    for setting in SETTINGS:
        text = os.environ.get(setting.env, "")
        if not text.strip():
            continue  # set but empty: the default
        try:
            os.environ[setting.env] = setting.check(_from_env(setting, text))
        except ValueError as exc:
            problems.append(f"{setting.env}={text!r}: expected {exc}")
    if problems:
        raise InvalidRequest("; ".join(problems), suggestion="fix or unset them")


def apply(path: Path | None = None) -> dict[str, str]:
    """Check the environment, then export the file's values into it (set variables win);
    returns the environment variable → source map for `rbee config show`."""
    check_environment()
    path = path or config_path()
    if os.environ.get("RBEE_CONFIG") and not path.exists():
        raise InvalidRequest(
            f"RBEE_CONFIG names {path}, which does not exist",
            suggestion="create it, or unset RBEE_CONFIG to use the default file",
        )
    sources = {s.env: "environment" for s in SETTINGS if s.env in os.environ}
    for env, value in read_file(path).items():
        if env not in os.environ:
            os.environ[env] = value
            sources[env] = str(path)
    return sources


def show(sources: dict[str, str], flags: dict[str, object] | None = None) -> str:
    """Every setting's effective value and where it came from."""
    path = config_path()
    lines = [f"# {path}" + ("" if path.exists() else " (no such file: defaults and environment)")]
    for s in SETTINGS:
        flag = (flags or {}).get(s.key)
        if flag is not None:
            value, source = str(flag), "flag"
        elif s.env in os.environ:
            value, source = os.environ[s.env], sources.get(s.env, "environment")
            if s.check is _bool:
                value = "true" if value else "false"
        else:
            value, source = s.default, "default"
        lines.append(f"{s.section}.{s.key} = {value}    ({source}; {s.env})")
    return "\n".join(lines) + "\n"
