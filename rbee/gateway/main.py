"""`rbee serve`: check the listen address against the key rules, bind, serve until a signal.

On loopback the gateway needs no key: whoever can reach it can already run `rbee infer`. On any
other address it refuses to start without API keys, so a LAN never gets an open endpoint by
accident. uvicorn serves; the first SIGINT/SIGTERM stops taking requests, ends the answers in
flight with HIVE_DRAINING and cancels their jobs on the workers; a second one stops at once.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from types import FrameType

import uvicorn

from rbee import log
from rbee.errors import ExitCode, HiveDraining, InvalidRequest
from rbee.gateway.app import KEEPALIVE_INTERVAL_S, Gateway, GatewayConfig
from rbee.gateway.auth import KEYS_ENV, load_keys
from rbee.gateway.jobs import READY_TIMEOUT_S
from rbee.protocol.messages import KEEP_ALIVE_DEFAULT
from rbee.transport.sockets import cannot_listen, is_loopback

DEFAULT_LISTEN = "127.0.0.1:7833"
DEFAULT_PORT = 7833
OLLAMA_PORT = 11434  # Ollama's own: where its clients look by default
GRACEFUL_SHUTDOWN_S = 5  # for answers to reach their clients once their jobs are stopped
DRAIN_RETRY_AFTER_S = 5.0

logger = log.get(__name__)


def parse_listen(listen: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[V6]:PORT`` → host and port (port 0: any free one)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]]+)(?::(\d{1,5}))?", listen)
    host = m and (m.group(1) or m.group(3))
    port = int((m.group(2) or m.group(4) or default_port) if m else -1)
    if not host or not 0 <= port < 65536:
        raise InvalidRequest(
            f"--listen {listen!r} is not HOST[:PORT]",
            suggestion="e.g. 127.0.0.1:7833 or [::1]:7833",
        )
    return host, port


class Server:
    """A bound gateway: ``serve`` blocks until ``request_stop`` or a signal."""

    def __init__(
        self, host: str, port: int, config: GatewayConfig, also: tuple[str, int] | None = None
    ) -> None:
        """``also``: a second address (``--ollama-listen``), served the same routes."""
        self.config = config
        self.gateway = Gateway(config)
        self.sock = _bind(host, port)
        self.socks = [self.sock]
        if also is not None:
            try:
                self.socks.append(_bind(*also, "--ollama-listen port"))
            except BaseException:
                self.sock.close()
                raise
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.uvicorn = _Uvicorn(
            self.gateway,
            uvicorn.Config(
                self.gateway.app(),
                log_level="warning",
                access_log=False,  # request lines are logged by the gateway, without headers
                lifespan="on",
                http="h11",  # pure Python, no optional extras: the same in a venv and a bundle
                loop="asyncio",
                ws="none",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                server_header=False,
            ),
        )

    @property
    def url(self) -> str:
        """The base URL clients use (``…/v1`` for OpenAI clients)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ollama_url(self) -> str:
        """Where Ollama's clients find it (OLLAMA_HOST): the second address, else the first."""
        if len(self.socks) < 2:
            return self.url
        host, port = self.socks[1].getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve(self) -> None:
        """Serve on the bound socket until stopped."""
        try:
            self.uvicorn.run(sockets=self.socks)
        finally:
            for sock in self.socks:
                sock.close()

    def request_stop(self) -> None:
        """Stop serving (thread-safe)."""
        self.uvicorn.should_exit = True


class _Uvicorn(uvicorn.Server):
    """uvicorn, plus ending the answers in flight when it stops (rather than waiting for them,
    then cutting them off with a traceback), minus re-raising the stopping signal once it has
    shut down (which would end `rbee serve` by that signal instead of exit code 0)."""

    def __init__(self, gateway: Gateway, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Answer every request in flight with HIVE_DRAINING (503: retry elsewhere) and cancel
        its job, then let uvicorn close the connections."""
        self.gateway.jobs.interrupt_all(
            HiveDraining("the gateway is shutting down", retry_after_s=DRAIN_RETRY_AFTER_S)
        )
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: stop gracefully; second: stop now."""
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def prepare(
    listen: str = DEFAULT_LISTEN,
    *,
    node: str | None = None,
    api_keys_file: str | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    keepalive_s: float = KEEPALIVE_INTERVAL_S,
    worker_keep_alive_s: float = KEEP_ALIVE_DEFAULT,
    backend: str = "auto",
    device: str = "",
    ollama_listen: str = "",
) -> Server:
    """Check the key rules and bind; raises InvalidRequest or AccessDenied instead of starting
    an open gateway on the network. ``ollama_listen``: a second address, where tools that
    expect Ollama (port 11434) find it."""
    host, port = parse_listen(listen)
    also = parse_listen(ollama_listen, OLLAMA_PORT) if ollama_listen else None
    keys = load_keys(api_keys_file)
    loopback = is_loopback(host) and (also is None or is_loopback(also[0]))
    if not loopback and not keys:
        where = host if not is_loopback(host) else also[0] if also else host
        raise InvalidRequest(
            f"refusing to listen on {where} without API keys: anyone on the network could use it",
            suggestion=f"give --api-keys-file (mode 600, one key a line) or set {KEYS_ENV}, "
            "or listen on 127.0.0.1",
        )
    config = GatewayConfig(
        node=node,
        api_keys=keys,
        allow_local_models=loopback,
        keepalive_s=keepalive_s,
        ready_timeout_s=ready_timeout_s,
        worker_keep_alive_s=worker_keep_alive_s,
        backend=backend,
        device=device,
    )
    return Server(host, port, config, also)


def run(server: Server) -> int:
    """`rbee serve`: run a prepared gateway until SIGINT/SIGTERM; the exit code."""
    config = server.config
    logger.info(
        "gateway listening",
        url=server.url,
        openai_base_url=server.url + "/v1",
        ollama_host=server.ollama_url,
        auth=f"{len(config.api_keys)} API keys" if config.api_keys else "none (loopback only)",
        node=config.node or "chosen per request",
        backend=config.backend + (f":{config.device}" if config.device else ""),
    )
    server.serve()
    logger.info("gateway stopped")
    return ExitCode.OK


def _bind(host: str, port: int, what: str = "--listen port") -> socket.socket:
    """A listening socket, bound before serving so port 0 (tests) yields a known port."""
    family = socket.AF_INET6 if _is_v6(host) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(host, port, exc.errno or 0, exc.strerror or str(exc), what) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False
