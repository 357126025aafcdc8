"""Where rbee keeps its files, and how it starts itself again.

The data directory follows XDG (``$XDG_DATA_HOME/rbee``, else ``~/.local/share/rbee``) and is
overridden by ``RBEE_DATA_DIR``. ``self_command`` is how a hive spawns workers and a keeper an
ephemeral hive: the same program, whether it runs from source or as a PyInstaller binary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rbee.errors import InvalidRequest

DEFAULT_HIVE_PORT = 7830
DEFAULT_STREAM_PORT = 7831


def data_dir() -> Path:
    """The directory holding the catalog and downloaded models (created on demand)."""
    explicit = os.environ.get("RBEE_DATA_DIR")
    if explicit:
        base = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".local" / "share") / "rbee"
    base.mkdir(parents=True, exist_ok=True)
    return base


def cache_dir() -> Path:
    """Where facts about this machine are cached (the engine probe's verdict): ``RBEE_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/rbee``, else ``~/.cache/rbee``. Created by whoever writes there."""
    explicit = os.environ.get("RBEE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rbee"


def catalog_path() -> Path:
    """The SQLite catalog of this machine's models."""
    return data_dir() / "catalog.db"


def self_command() -> list[str]:
    """The argv prefix that runs this same rbee program again."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "rbee"]


def hive_port() -> int:
    """The ROUTER port a hive binds and a keeper tries first (``RBEE_HIVE_PORT``)."""
    return _env_port("RBEE_HIVE_PORT", DEFAULT_HIVE_PORT)


def stream_port() -> int:
    """The token-stream (XPUB) port of a hive (``RBEE_STREAM_PORT``)."""
    return _env_port("RBEE_STREAM_PORT", DEFAULT_STREAM_PORT)


def _env_port(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidRequest(f"{name}={text!r} is not a port (1-65535)", suggestion=f"unset {name}")
    return int(text)
