"""`rbee lender`: llama.cpp's RPC server in a process of its own, started by a hive.

A hive lends its memory to a model held by another hive by running this process: the same
binary, no extra program to install. It binds loopback only (rbee.rpc.loopback_endpoint), keeps
the tensors it is sent in a cache by hash (a second load of the same model sends no weights),
and exits with its hive (PR_SET_PDEATHSIG, and a watchdog for a hive that is not its parent).
llama.cpp's server runs in this process's main thread until the process ends; it serves one
borrower at a time.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import structlog

from rbee.errors import InvalidRequest
from rbee.process import die_with_parent
from rbee.rpc import loopback_endpoint, serve

logger = structlog.get_logger("rbee.lender")

WATCH_INTERVAL_S = 0.5


def add_flags(parser: argparse.ArgumentParser) -> None:
    """`rbee lender`'s flags."""
    parser.add_argument("--endpoint", required=True, help="loopback HOST:PORT to serve on")
    parser.add_argument("--cache-dir", default="", help="where sent tensors are kept by hash")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: rbee's default)")
    parser.add_argument("--device", default="", help="a ggml device such as CUDA0 (default CPU)")
    parser.add_argument("--hive-pid", type=int, default=0, help="exit when this process is gone")


def run(args: argparse.Namespace) -> int:
    """Serve until the hive is gone (never returns normally while it lives)."""
    from rbee.llamacpp import default_threads

    loopback_endpoint(args.endpoint)
    if args.threads < 0:
        raise InvalidRequest(f"--threads must be 0 or more (got {args.threads})")
    die_with_parent()
    if args.hive_pid:
        threading.Thread(target=_watch, args=(args.hive_pid,), daemon=True).start()
    cache = Path(args.cache_dir) if args.cache_dir else None
    threads = args.threads or default_threads()
    logger.info("lending", endpoint=args.endpoint, device=args.device or "CPU", threads=threads)
    serve(args.endpoint, cache, threads, args.device)
    return 1  # serve raises when llama.cpp's loop ends; not reached


def _watch(hive_pid: int) -> None:
    """Exit at once when the hive is gone: no lender outlives the hive that started it."""
    while True:
        try:
            os.kill(hive_pid, 0)
        except ProcessLookupError:
            logger.warning("hive is gone; exiting", hive_pid=hive_pid)
            os._exit(0)
        except PermissionError:
            pass
        time.sleep(WATCH_INTERVAL_S)
