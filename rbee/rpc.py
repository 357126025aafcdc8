"""llama.cpp's RPC backend, reached through ggml's backend registry.

A model too big for one machine runs with some of its layers in another machine's memory:
llama.cpp's RPC backend makes a remote ``rpc-server`` look like one more device, and its layer
split puts layers there as it would on a second GPU. llama-cpp-python 0.3.36 no longer exposes
it (``rpc_servers`` was removed), so rbee reaches the backend's own functions the way
llama.cpp's tools do: load ``libggml-rpc.so`` (built with ``GGML_RPC``; packaging/engine.sh)
into ggml's registry and ask the registry for ``ggml_backend_rpc_add_server`` and
``ggml_backend_rpc_start_server`` by name.

llama.cpp's README calls the RPC server "fragile and insecure": whoever reaches its port may
read and write its memory. rbee's end of it therefore only ever binds and connects to loopback
(``loopback_endpoint``); what crosses machines goes through the hives' CURVE channel.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import os
import select
import socket
from pathlib import Path
from typing import Any

from rbee.errors import BackendUnavailable, InvalidRequest
from rbee.llamacpp import import_llama, libggml

RPC_LIBRARY = "libggml-rpc.so"
DEVICE_TYPE_CPU = 0  # ggml_backend_dev_type's GGML_BACKEND_DEVICE_TYPE_CPU
# ggml-rpc built with GGML_RPC_RDMA (its default where libibverbs is installed) probes every
# RDMA device of the machine on each connection, client and server, unless this is set; rbee's
# RPC is loopback only, where RDMA never applies, so it is always set (read at each connection).
NO_RDMA_ENV = "GGML_RPC_NO_RDMA"

AddServer = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
StartServer = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p
)


def read_burst(sock: socket.socket, limit: int) -> bytes:
    """What ``sock`` has now, up to ``limit`` bytes: one read, then more while the kernel holds
    more without waiting. An RPC message of 200 KB arrives in 64 KB pieces; relayed as they
    come, each would be a frame and a wake-up of every process on the way. b"": the peer
    closed."""
    first = sock.recv(limit)
    parts, size = [first], len(first)
    while first and size < limit and select.select([sock], [], [], 0)[0]:
        try:
            more = sock.recv(limit - size)
        except (BlockingIOError, InterruptedError):
            break
        if not more:
            break  # the peer closed: the next read says so
        parts.append(more)
        size += len(more)
    return b"".join(parts)


def loopback_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` checked to be a loopback address with a port: rbee never lets an RPC
    server or client touch anything else."""
    host, sep, port = endpoint.rpartition(":")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        loopback, number = False, 0
    if not sep or not loopback or not 0 < number < 65536:
        raise InvalidRequest(
            f"an RPC endpoint must be a loopback address and port such as 127.0.0.1:50052, "
            f"not {endpoint!r}: llama.cpp's RPC server has no authentication"
        )
    return host, number


@functools.cache
def _ggml() -> Any:
    """libggml with the functions this module calls typed (after import_llama: the CPU backend
    registered)."""
    import_llama()
    ggml = libggml()
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    return ggml


@functools.cache
def _registry() -> int:
    """The RPC backend's registry entry, loaded once per process (RDMA off from then on)."""
    os.environ[NO_RDMA_ENV] = "1"
    ggml = _ggml()
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        path = Path(import_llama().__file__).parent / "lib" / RPC_LIBRARY
        reg = ggml.ggml_backend_load(str(path).encode()) if path.is_file() else None
    if not reg:
        raise BackendUnavailable(
            "this llama.cpp build has no RPC backend, so it cannot lend or borrow memory",
            suggestion="rebuild the engine with GGML_RPC on (make setup does)",
        )
    return int(reg)


def _function(name: str, kind: Any) -> Any:
    address = _ggml().ggml_backend_reg_get_proc_address(_registry(), name.encode())
    if not address:
        raise BackendUnavailable(f"llama.cpp's RPC backend has no {name}")
    return kind(address)


def add_servers(endpoints: list[str]) -> None:
    """Make each RPC server a device of this process, before a model loads (llama.cpp puts
    RPC devices first and splits layers over them like GPUs). Connecting happens here; a
    server that is not there makes llama.cpp abort the process."""
    add = _function("ggml_backend_rpc_add_server", AddServer)
    for endpoint in endpoints:
        loopback_endpoint(endpoint)
        reg = add(endpoint.encode())
        if not reg:
            raise BackendUnavailable(f"llama.cpp could not add the RPC server {endpoint}")
        _ggml().ggml_backend_register(reg)


def serve(endpoint: str, cache_dir: Path | None, threads: int, device: str = "") -> None:
    """Run llama.cpp's RPC server on ``endpoint`` (loopback only) for ``device`` (a ggml
    device name such as CUDA0; "" for the CPU) until the process ends. ``cache_dir``: where
    it keeps tensors it was sent, by hash, so loading the same model again sends no weights."""
    loopback_endpoint(endpoint)
    ggml = _ggml()
    dev = (
        ggml.ggml_backend_dev_by_name(device.encode())
        if device
        else ggml.ggml_backend_dev_by_type(DEVICE_TYPE_CPU)
    )
    if not dev:
        raise BackendUnavailable(f"llama.cpp has no device {device or 'CPU'} to lend")
    start = _function("ggml_backend_rpc_start_server", StartServer)
    devices = (ctypes.c_void_p * 1)(dev)
    cache = str(cache_dir).encode() if cache_dir is not None else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    start(endpoint.encode(), cache, threads, 1, ctypes.cast(devices, ctypes.c_void_p))
    raise BackendUnavailable(f"llama.cpp's RPC server on {endpoint} stopped (see its log)")
