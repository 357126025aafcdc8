"""1 and 2: warm stream efficiency and warm time to first token, rbee against llama-cpp-python
in this process.

The baseline is bench/stream_efficiency.py's: ``Llama.generate()`` plus per-token, UTF-8 safe
detokenization, default model, raw prompt, greedy, 256 tokens past end-of-sequence. rbee's side
runs against a `rbee hive` whose worker is loaded, three ways per repetition (interleaved with
the baseline):

* `rbee infer` (the command): tokens/s and "first token after N ms" from its summary line. That
  clock starts when the keeper begins the request (after interpreter start-up and imports) and
  so includes finding the local hive, Hello, EnsureWorker, subscribing and StartJob;
* the same command timed from its launch to its first byte on stdout (what a person waits for,
  interpreter start-up included);
* this process as the keeper (``rbee.keeper``'s own connect, InferJob):
  each phase timed, and StartJob (with the subscription before it) → first Token frame;
* the same with the synthetic engine (`synthetic:0`, no model to run): StartJob → first Token
  minus the engine's own time to its first token (from the Done frame), rbee's cost alone.

    python bench/warm.py [--reps 5]
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from typing import Any

from common import (
    Row,
    TimedWriter,
    default_model,
    environ,
    infer_argv,
    median,
    run_one,
    running_hive,
    standalone,
)
from stream_efficiency import PROMPT, in_process

TOKENS = 256
PROBE_TOKENS = 8


def keeper_probe(env: dict[str, str], model: str = "") -> dict[str, float]:
    """One warm request made by this process with the keeper's calls (default model unless
    ``model``); each phase in ms."""
    import zmq

    from rbee.catalog import DEFAULT_MODEL
    from rbee.keeper.connect import connect
    from rbee.keeper.infer import InferRequest, Printer, Reporter, follow
    from rbee.keeper.job import InferJob
    from rbee.protocol.messages import GenerateParams

    params = GenerateParams(
        prompt=PROMPT, max_tokens=PROBE_TOKENS, temperature=0.0, raw=True, ignore_eos=True
    )
    request = InferRequest(model or DEFAULT_MODEL, params)
    err = TimedWriter()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with environ(env):
        t0 = time.monotonic()
        link = connect(ctx, None, request.model)
        try:
            t1 = time.monotonic()
            printer = Printer(Reporter(err), io.StringIO(), t1, PROBE_TOKENS)  # type: ignore[arg-type]
            follow(InferJob(link, request), printer)
        finally:
            link.close()
            ctx.destroy(linger=0)
    result = printer.result
    # err's clock is perf_counter, the keeper's monotonic: the same clock on Linux
    t2 = next(t for t, line in err.chunks if line.startswith(b"[worker]"))
    accepted = next(t for t, line in err.chunks if line.startswith(b"[inference]"))
    assert result.done is not None and result.tokens == PROBE_TOKENS, err.text
    return {
        "connect_ms": (t1 - t0) * 1000,
        "worker_ms": (t2 - t1) * 1000,  # subscribing, then the idle worker from the status
        "start_job_to_accepted_ms": (accepted - t2) * 1000,
        "start_job_to_first_token_ms": (t1 + result.first_token_s - t2) * 1000,
        "worker_ttft_ms": result.done.ttft_s * 1000,
    }


def run(reps: int) -> list[Row]:
    """Interleaved repetitions: in-process, `rbee infer`, in-process keeper."""
    from rbee.hive.probe import for_model
    from rbee.worker.engine import in_process as load_like_a_worker

    llama = load_like_a_worker(str(default_model()), for_model(str(default_model())))
    argv = infer_argv("--raw", "-t", "0", "--ignore-eos", "-n", str(TOKENS), PROMPT)
    base: list[tuple[float, float]] = []
    cli: list[tuple[float, float, float]] = []
    probes: list[dict[str, float]] = []
    bare: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, running_hive(tmp) as hive:
        run_one(infer_argv("--raw", "-t", "0", "-n", "16", PROMPT), hive.env).summary()  # load
        in_process(llama, 16)
        keeper_probe(hive.env)
        keeper_probe(hive.env, "synthetic:0")  # spawns the synthetic worker
        for _ in range(reps):
            base.append(in_process(llama, TOKENS))
            done = run_one(argv, hive.env)
            summary = done.summary()
            assert summary.tokens == TOKENS, done.err.text
            cli.append((summary.tokens_per_s, summary.first_token_ms, done.first_output_ms()))
            probes.append(keeper_probe(hive.env))
            bare.append(keeper_probe(hive.env, "synthetic:0"))
    del llama
    ttft = [b[1] for b in base]
    phases: dict[str, Any] = {k: round(median([p[k] for p in probes]), 1) for k in probes[0]}
    first = [p["start_job_to_first_token_ms"] for p in probes]
    return [
        Row(
            "1",
            "stream efficiency: warm `rbee infer` ÷ in-process tokens/s",
            [c[0] / b[0] for b, c in zip(base, cli, strict=True)],
            rbee=[c[0] for c in cli],
            baseline=[b[0] for b in base],
            op="≥",
            target=0.99,
            digits=3,
        ),
        Row(
            "2",
            "warm TTFT: `rbee infer` summary − in-process",
            [c[1] - t for c, t in zip(cli, ttft, strict=True)],
            unit="ms",
            rbee=[c[1] for c in cli],
            baseline=ttft,
            op="≤",
            target=5,
            note="keeper's clock: request start (after imports) → first token; includes "
            "finding the hive (Hello + Status), subscribe, StartJob (EnsureWorker only when no "
            "idle worker is known)",
        ),
        Row(
            "2",
            "warm TTFT: keeper API, StartJob → first Token − in-process",
            [f - t for f, t in zip(first, ttft, strict=True)],
            unit="ms",
            rbee=first,
            baseline=ttft,
            op="≤",
            target=5,
            note="phases (median ms): "
            + ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in phases.items()),
        ),
        Row(
            "2",
            "warm TTFT, no engine: StartJob → first Token, synthetic:0 − its engine",
            [b["start_job_to_first_token_ms"] - b["worker_ttft_ms"] for b in bare],
            unit="ms",
            rbee=[b["start_job_to_first_token_ms"] for b in bare],
            baseline=[b["worker_ttft_ms"] for b in bare],
            op="≤",
            target=5,
            digits=2,
            raw_digits=2,
            note="rbee's own cost on the way to the first token: subscribe, StartJob, dispatch, "
            "two hops",
        ),
        Row(
            "2",
            "warm TTFT: `rbee infer` launch → first byte on stdout − in-process",
            [c[2] - t for c, t in zip(cli, ttft, strict=True)],
            unit="ms",
            rbee=[c[2] for c in cli],
            baseline=ttft,
            note="what a person waits for: interpreter start-up and imports included (see 7)",
        ),
    ]


if __name__ == "__main__":
    sys.exit(standalone(run, 5))
