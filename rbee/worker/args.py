"""How a hive tells a worker to run, both sides of the process boundary in one place.

A worker is `rbee worker FLAGS…`. The hive builds the flags with ``WorkerArgs.argv``; the
worker's command line is declared by ``add_flags`` and read back with ``WorkerArgs.parse``. A
flag added here reaches both sides, and a unit test holds the round trip to equality.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from rbee.errors import InvalidRequest
from rbee.protocol.messages import BACKENDS, MAX_SLOTS, MAX_STREAM_INTERVAL_MS, STREAM_INTERVAL_MS
from rbee.rpc import loopback_endpoint


@dataclass(frozen=True)
class WorkerArgs:
    """One worker's settings."""

    worker_id: str
    model_path: str
    control: str  # the hive's local ROUTER (progress, Ready, heartbeats, jobs)
    stream: str  # the hive's local XSUB (token frames)
    n_ctx: int
    hive_pid: int  # the worker exits when this process is gone
    backend: str = "cpu"
    device: str = ""  # a CUDA device's NVML index (the machine's numbering); "" on the CPU
    threads: int = 0  # 0: rbee.llamacpp.default_threads()
    extra_bufts: bool = True  # False where the hive's engine probe saw them fail
    slots: int = 1  # jobs decoded together, each with a context of n_ctx tokens
    gpu_layers: int = -1  # CUDA: layers on the GPUs (-1: all; fewer: the rest on the CPU)
    layers: tuple[int, ...] = ()  # CUDA over several GPUs: layers per GPU ("0+1" in ``device``)
    stream_interval_ms: int = STREAM_INTERVAL_MS  # tokens closer together share a frame
    rpc: tuple[str, ...] = ()  # loopback RPC servers (lent memory) that hold ``gpu_layers`` layers

    def argv(self) -> list[str]:
        """The flags after `rbee worker` (``--backend``/``--device`` only off the CPU, so a CPU
        worker's command line stays what it always was)."""
        argv = [
            "--worker-id",
            self.worker_id,
            "--model-path",
            self.model_path,
            "--control",
            self.control,
            "--stream",
            self.stream,
            "--n-ctx",
            str(self.n_ctx),
            "--hive-pid",
            str(self.hive_pid),
        ]
        if self.backend != "cpu":
            argv += ["--backend", self.backend, "--device", self.device or "0"]
        if self.rpc:
            argv += ["--rpc", ",".join(self.rpc)]
        if self.backend != "cpu" or self.rpc:  # layers on GPUs or lent memory
            if self.gpu_layers >= 0:
                argv += ["--gpu-layers", str(self.gpu_layers)]
            if len(self.layers) > 1:
                argv += ["--tensor-split", ",".join(str(n) for n in self.layers)]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        if not self.extra_bufts:
            argv += ["--no-extra-bufts"]
        if self.slots != 1:
            argv += ["--slots", str(self.slots)]
        if self.stream_interval_ms != STREAM_INTERVAL_MS:
            argv += ["--stream-interval-ms", str(self.stream_interval_ms)]
        return argv

    @classmethod
    def parse(cls, args: argparse.Namespace) -> WorkerArgs:
        """The settings ``add_flags`` parsed; a worker is started by a hive, never by hand."""
        if not (args.worker_id and args.control and args.stream and args.hive_pid):
            raise InvalidRequest(
                "rbee worker is started by a hive: --worker-id, --control, --stream and "
                "--hive-pid are required (or --probe)"
            )
        if not 1 <= args.slots <= MAX_SLOTS:
            raise InvalidRequest(f"--slots must be 1 to {MAX_SLOTS} (got {args.slots})")
        if not 0 <= args.stream_interval_ms <= MAX_STREAM_INTERVAL_MS:
            raise InvalidRequest(
                f"--stream-interval-ms must be 0 to {MAX_STREAM_INTERVAL_MS} "
                f"(got {args.stream_interval_ms})"
            )
        try:
            layers = tuple(int(n) for n in args.tensor_split.split(",") if n)
        except ValueError:
            raise InvalidRequest(
                f"--tensor-split wants counts like 16,15: {args.tensor_split!r}"
            ) from None
        rpc = tuple(e for e in args.rpc.split(",") if e)
        for endpoint in rpc:
            loopback_endpoint(endpoint)
        if any(n < 0 for n in layers) or args.gpu_layers < -1:
            raise InvalidRequest("--gpu-layers and --tensor-split take counts of layers")
        return cls(
            args.worker_id,
            args.model_path,
            args.control,
            args.stream,
            args.n_ctx,
            args.hive_pid,
            backend=args.backend,
            device=args.device,
            threads=args.threads,
            extra_bufts=args.extra_bufts,
            slots=args.slots,
            gpu_layers=args.gpu_layers,
            layers=layers,
            stream_interval_ms=args.stream_interval_ms,
            rpc=rpc,
        )


def add_flags(parser: argparse.ArgumentParser) -> None:
    """`rbee worker`'s flags (``--probe``: decode a few tokens and report, for the engine probe)."""
    parser.add_argument("--worker-id", default="")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--control", default="")
    parser.add_argument("--stream", default="")
    parser.add_argument("--n-ctx", type=int, default=0)
    parser.add_argument("--hive-pid", type=int, default=0)
    parser.add_argument("--backend", choices=BACKENDS, default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: rbee's default)")
    parser.add_argument("--no-extra-bufts", dest="extra_bufts", action="store_false")
    parser.add_argument("--probe", action="store_true", help="decode a few tokens and report")
    parser.add_argument("--device", default="", help="CUDA devices' NVML indexes: 0, or 0+1")
    parser.add_argument("--gpu-layers", type=int, default=-1, help="layers on the GPUs (-1: all)")
    parser.add_argument("--tensor-split", default="", help="layers per GPU, e.g. 16,15")
    parser.add_argument(
        "--slots", type=int, default=1, help="jobs decoded together, each with --n-ctx tokens"
    )
    parser.add_argument(
        "--rpc", default="", help="loopback RPC servers holding --gpu-layers layers: HOST:PORT,…"
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=int,
        default=STREAM_INTERVAL_MS,
        help="tokens that come closer together than this share a frame (0: one per token)",
    )
