"""How a hive runs: where it listens and what it may do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rbee.hive.registry import Limits
from rbee.hive.stall import STALL_S
from rbee.protocol.messages import HIVE_KEEP_ALIVE_S, STREAM_INTERVAL_MS
from rbee.transport.sockets import is_loopback

DRAIN_GRACE_S = 10.0  # how long running jobs may finish after a SIGTERM
RETRY_AFTER_S = 2.0  # what a busy or draining hive tells keepers to wait


@dataclass(frozen=True)
class HiveConfig:
    """A hive's settings (flags, environment and file, checked by rbee.config)."""

    host: str
    port: int
    stream_port: int
    data_dir: Path
    node: str = ""
    ephemeral: bool = False
    preload: str = ""  # a model whose worker starts loading at once (an ephemeral hive's)
    limits: Limits = field(default_factory=Limits)
    keep_alive_s: float = HIVE_KEEP_ALIVE_S
    drain_grace_s: float = DRAIN_GRACE_S
    secure: bool = False  # CURVE even on loopback (always on for any other address)
    threads: int = 0  # CPU threads per worker; 0: as many as llama.cpp's own default
    parallel: int = 0  # slots (jobs decoded together) per worker; 0: AUTO_SLOTS, as memory allows
    backend: str = "auto"  # what a request naming no backend gets: auto, or pinned to cpu/cuda
    stream_interval_ms: int = STREAM_INTERVAL_MS  # a worker's tokens closer together share a frame
    lend: bool = True  # lend memory to peer hives' models (keys with the hive or admin role)
    memory_limit: str = "0"  # RBEE_MEMORY_LIMIT: the most RAM the hive plans with (0: all)
    lender_stall_s: float = STALL_S  # a lender making no progress this long mid-job is lost
    share_rate: str = "0"  # the most bytes/s it sends model files to peer hives (0: no limit)
    metrics_host: str = "127.0.0.1"  # the loopback /metrics server's address (loopback only)
    metrics_port: int = 0  # its port; 0: no metrics server (keepers still ask over ZeroMQ)

    @property
    def loopback_only(self) -> bool:
        """Development mode: nothing but this machine can reach the hive."""
        return is_loopback(self.host)
