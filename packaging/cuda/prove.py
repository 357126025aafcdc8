"""Measure rbee against llama-cpp-python in-process, on one model and one backend.

For each model: (1) in a fresh process, llama-cpp-python alone: load as rbee's worker does, then
``Llama.generate()`` with a UTF-8-safe per-token detokenizer, greedy, N tokens (the stricter
baseline of shared/GPU.md), timing the first token and the rate after it, and reading what
llama.cpp reports it allocated and what the process holds (RSS; GPU memory through NVML);
(2) through rbee: a real hive (loopback, development mode) and its worker, with the keeper's
own code (``rbee.keeper.infer.run``), a cold request then warm ones, the rate measured where the
keeper receives the tokens; the hive's memory estimate against what NVML says the worker holds;
(3) `rbee infer` itself, once, as a person would run it; (4) BACKEND_UNAVAILABLE for a device
that does not exist. One JSON line per model goes to --out; a short report to stdout.

    python packaging/cuda/prove.py --backend cuda --out results.jsonl NAME=PATH [NAME=PATH ...]

Run from the repository root with rbee (the wired hive) and llama-cpp-python importable.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "The history of the city begins with"
BUFFER_LINE = re.compile(r"(\S+) (model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
OFFLOAD_LINE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
HIVE_START_TIMEOUT_S = 30.0


def rss() -> int:
    """This process's resident memory."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def vram(pid: int) -> int | None:
    """GPU memory held by a process (NVML), None where NVML cannot say."""
    from rbee import gpu

    return gpu.process_vram_bytes(pid)


def context_for(path: str) -> int:
    """The context rbee's hive gives a file: model (its own, up to 4096 tokens)."""
    from rbee.gguf import read_gguf_info

    ctx = read_gguf_info(path).context_length or 4096
    return min(ctx, 4096)


# --------------------------------------------------------------------------- in-process


def inproc(path: str, backend: str, n: int, runs: int) -> dict[str, Any]:
    """llama-cpp-python alone, loaded and driven the way rbee's worker does it."""
    rss_start = rss()
    import llama_cpp

    from rbee.worker.engine import gpu_params

    rss_import = rss()
    n_ctx = context_for(path)
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # verbose=True writes llama.cpp's load report to fd 2
        try:
            started = time.perf_counter()
            llm = llama_cpp.Llama(
                model_path=path, n_ctx=n_ctx, verbose=True, **gpu_params(llama_cpp, backend, 0)
            )
            load_s = time.perf_counter() - started
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    buffers: dict[str, float] = {}
    for where, kind, size in BUFFER_LINE.findall(text):
        key = f"{where} {kind}"
        buffers[key] = buffers.get(key, 0.0) + float(size)
    offload = OFFLOAD_LINE.search(text)
    llm.verbose = False
    rss_load = rss()
    vram_load = vram(os.getpid())
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    vocab = llm._model.vocab
    results = []
    for _ in range(runs + 1):  # the first run warms the caches and the GPU kernels
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stamps: list[float] = []
        pieces: list[str] = []
        t0 = time.perf_counter()
        for token in llm.generate(
            tokens, top_k=40, top_p=0.95, min_p=0.05, temp=0.0, repeat_penalty=1.0, reset=True
        ):
            llama_cpp.llama_token_is_eog(vocab, token)  # the worker checks each token too
            pieces.append(decoder.decode(llm.detokenize([token])))
            stamps.append(time.perf_counter())
            if len(stamps) >= n:
                break
        results.append(
            {
                "ttft_s": stamps[0] - t0,
                "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "tokens": len(stamps),
            }
        )
    return {
        "n_ctx": n_ctx,
        "load_s": load_s,
        "buffers_mib": buffers,
        "offloaded": f"{offload[1]}/{offload[2]}" if offload else "",
        "rss_start": rss_start,
        "rss_after_import": rss_import,
        "rss_after_load": rss_load,
        "rss_after_generate": rss(),
        "vram_after_load": vram_load,
        "vram_after_generate": vram(os.getpid()),
        "runs": results[1:],
        "warmup": results[0],
        "text": "".join(pieces)[:120],
    }


# --------------------------------------------------------------------------- through rbee


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HiveProcess:
    """`rbee hive` on loopback (development mode) in a scratch data directory."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.stream_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "RBEE_DATA_DIR": str(workdir / "data"),
            "RBEE_MDNS_INTERFACES": "127.0.0.1",
            "RBEE_CLUSTER": f"prove-{os.getpid()}",
            "RBEE_LOG_LEVEL": "info",
        }
        self.log_path = workdir / "hive.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "rbee", "hive", "--port", str(self.port)),
                *("--stream-port", str(self.stream_port), "--node-name", "prove"),
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.node = f"127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        import zmq

        from rbee.protocol.messages import Hello
        from rbee.transport.sockets import DealerClient

        deadline = time.monotonic() + HIVE_START_TIMEOUT_S
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            while time.monotonic() < deadline:
                client = DealerClient(ctx, f"tcp://{self.node}")
                try:
                    client.request(Hello(), 1.0)
                    return
                except Exception:
                    time.sleep(0.2)
                finally:
                    client.close()
        finally:
            ctx.destroy(linger=0)
        raise RuntimeError(f"the hive did not start; see {self.log_path}")

    def request(self, frame: Any) -> Any:
        import zmq

        from rbee.transport.sockets import DealerClient

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        client = DealerClient(ctx, f"tcp://{self.node}")
        try:
            return client.request(frame, 5.0)
        finally:
            client.close()
            ctx.destroy(linger=0)

    def rbee(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rbee", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def through_rbee(path: str, backend: str, n: int, runs: int, workdir: Path) -> dict[str, Any]:
    """A hive and its worker on ``backend``; the keeper's code measures what arrives."""
    import io

    from rbee.errors import RbeeError
    from rbee.hive.placement import estimate_for_file
    from rbee.keeper.infer import InferRequest
    from rbee.keeper.infer import run as infer
    from rbee.protocol.messages import GenerateParams, ListWorkers, Status

    hive = HiveProcess(workdir)
    out: dict[str, Any] = {}
    try:
        hive.wait_ready()
        status = hive.request(Status())
        out["devices"] = [d.to_wire() for d in status.devices]
        params = GenerateParams(
            prompt=PROMPT, max_tokens=n, temperature=0.0, raw=True, ignore_eos=True
        )
        request = InferRequest(
            model=f"file:{path}", params=params, node=hive.node, keep_alive_s=-1, backend=backend
        )
        results = []
        for i in range(runs + 2):  # cold (spawn + load), a warm-up, then the measured runs
            started = time.perf_counter()
            result = infer(request, out=io.StringIO(), err=io.StringIO())
            wall = time.perf_counter() - started
            assert result.done is not None
            results.append(
                {
                    "reused": result.reused,
                    "first_token_s": result.first_token_s,
                    "worker_ttft_s": result.done.ttft_s,
                    "tok_s": (result.tokens - 1) / result.stream_s,
                    "worker_tok_s": (result.done.tokens - 1) / max(result.done.decode_s, 1e-9),
                    "tokens": result.tokens,
                    "wall_s": wall,
                }
            )
            if i == 0:
                workers = hive.request(ListWorkers()).workers
                out["worker"] = workers[0].to_wire() if workers else {}
                out["worker_vram_nvml"] = vram(workers[0].pid) if workers else None
        out["cold"], out["runs"] = results[0], results[2:]
        out["text"] = result.text[:120]
        out["estimate"] = estimate_for_file(path, context_for(path), backend).describe()
        out["estimate_bytes"] = estimate_for_file(path, context_for(path), backend).total_bytes
        out["hive_vram"] = vram(hive.proc.pid)
        cli = hive.rbee(
            "infer", "--node", hive.node, "--backend", backend, "-m", f"file:{path}",
            "-n", "64", "-t", "0", "--raw", "--ignore-eos", PROMPT,
        )  # fmt: skip
        out["cli"] = {"rc": cli.returncode, "stderr": cli.stderr.strip().splitlines()}
        ps = hive.rbee("ps", "--node", hive.node)
        out["ps"] = ps.stdout.strip().splitlines()
        bad = hive.rbee(
            "infer", "--node", hive.node, "--backend", "cuda", "--device", "7",
            "-m", f"file:{path}", "-n", "4", "hi",
        )  # fmt: skip
        out["bad_device"] = {"rc": bad.returncode, "stderr": bad.stderr.strip().splitlines()}
        nodes = hive.rbee("nodes", "--timeout", "1")
        out["nodes"] = nodes.stdout.strip().splitlines()
    except RbeeError as exc:
        out["error"] = f"{exc.code}: {exc.message}"
    finally:
        hive.stop()
        out["hive_log_tail"] = hive.log_path.read_text(errors="replace").splitlines()[-15:]
    return out


# --------------------------------------------------------------------------- report


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def summarize(name: str, path: str, res: dict[str, Any]) -> str:
    """A few lines a person can read."""
    ip, rb = res["inproc"], res["rbee"]
    lines = [f"== {name}: {Path(path).name} ({os.path.getsize(path) / 1e6:,.0f} MB)"]
    if ip.get("runs"):
        ip_rate = statistics.median(r["tok_s"] for r in ip["runs"])
        ip_ttft = statistics.median(r["ttft_s"] for r in ip["runs"])
        lines.append(
            f"in-process: {ip_rate:,.1f} tok/s, first token {ip_ttft * 1000:.1f} ms, "
            f"load {ip['load_s']:.2f} s, offloaded {ip['offloaded'] or '-'}, "
            f"buffers {ip['buffers_mib']}"
        )
        lines.append(
            f"in-process memory: VRAM {mib(ip['vram_after_load'])} after load, "
            f"{mib(ip['vram_after_generate'])} after generating; RSS growth "
            f"{mib(ip['rss_after_generate'] - ip['rss_after_import'])} "
            f"(import {mib(ip['rss_after_import'])}, load {mib(ip['rss_after_load'])})"
        )
    if rb.get("runs"):
        rb_rate = statistics.median(r["tok_s"] for r in rb["runs"])
        rb_ttft = statistics.median(r["first_token_s"] for r in rb["runs"])
        w_ttft = statistics.median(r["worker_ttft_s"] for r in rb["runs"])
        ratio = rb_rate / ip_rate if ip.get("runs") else float("nan")
        lines.append(
            f"rbee (warm, median of {len(rb['runs'])}): {rb_rate:,.1f} tok/s = {ratio:.3f} x "
            f"in-process; first token {rb_ttft * 1000:.1f} ms at the keeper "
            f"({w_ttft * 1000:.1f} ms in the worker); cold request "
            f"{rb['cold']['wall_s']:.2f} s, first token after {rb['cold']['first_token_s']:.2f} s"
        )
        w = rb.get("worker", {})
        lines.append(
            f"memory: hive estimate {rb['estimate']}; worker holds VRAM "
            f"{mib(w.get('vram_bytes'))} (NVML now {mib(rb.get('worker_vram_nvml'))}), RSS "
            f"{mib(w.get('rss_bytes'))}; hive process VRAM {mib(rb.get('hive_vram'))}"
        )
    if "error" in rb:
        lines.append(f"rbee FAILED: {rb['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("-n", type=int, default=256, help="tokens per run (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="measured runs (default 5)")
    parser.add_argument("--out", default="prove.jsonl")
    parser.add_argument("--inproc", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("models", nargs="*", metavar="NAME=PATH")
    args = parser.parse_args(argv)
    if args.inproc:  # the child process of the in-process measurement
        print(json.dumps(inproc(args.inproc, args.backend, args.n, args.runs)))
        return 0
    with open(args.out, "a") as sink:
        for item in args.models:
            name, path = item.split("=", 1)
            child = subprocess.run(
                [
                    *(sys.executable, __file__, "--inproc", path, "--backend", args.backend),
                    *("-n", str(args.n), "--runs", str(args.runs)),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            try:
                ip = json.loads(child.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                ip = {"error": child.stderr[-3000:]}
            with tempfile.TemporaryDirectory(prefix="rbee-prove-") as tmp:
                rb = through_rbee(path, args.backend, args.n, args.runs, Path(tmp))
            res = {"name": name, "path": path, "backend": args.backend, "inproc": ip, "rbee": rb}
            sink.write(json.dumps(res) + "\n")
            sink.flush()
            print(summarize(name, path, res), flush=True)
            if "error" in ip:
                print(f"in-process FAILED: {ip['error']}", flush=True)
            for key in ("cli", "bad_device"):
                if key in rb:
                    print(
                        f"-- rbee {key} (exit {rb[key]['rc']}):", *rb[key]["stderr"][-8:], sep="\n"
                    )
            for key in ("ps", "nodes"):
                print(f"-- rbee {key}:", *rb.get(key, []), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
