"""`rbee worker --probe`: load a model, decode a few tokens, report what the engine ran.

The hive runs this in a child process to learn whether a fast path works here
(rbee.hive.probe); a crash kills only this process. On success it prints one JSON line with the
CPU variant and features llama.cpp used.
"""

from __future__ import annotations

import json
import os
import signal
import time

from rbee.llamacpp import PROBE_FAULT_ENV, cpu_features, loaded_variant
from rbee.protocol.messages import Done, GenerateParams, RunJob
from rbee.worker.engine import Engine
from rbee.worker.slots import run_alone

PROBE_CTX = 256
PROBE_TOKENS = 32  # enough to tell two settings' speeds apart (about 0.4 s)
PROBE_PROMPT = "The sky is blue because"


def run_probe(model_path: str, threads: int, extra_bufts: bool) -> int:
    """Load ``model_path`` on the CPU and generate PROBE_TOKENS greedy tokens; 0 when it worked."""
    started = time.perf_counter()
    engine = Engine(
        model_path, PROBE_CTX, lambda _f: None, threads=threads, extra_bufts=extra_bufts
    )
    if extra_bufts and os.environ.get(PROBE_FAULT_ENV) == "extra-bufts":
        os.kill(os.getpid(), signal.SIGSEGV)  # stands in for a fast path that crashes here
    params = GenerateParams(
        prompt=PROBE_PROMPT, max_tokens=PROBE_TOKENS, temperature=0.0, raw=True, ignore_eos=True
    )
    frames = run_alone(engine, RunJob(job_id="probe", params=params))
    ends = [frame for frame in frames if isinstance(frame, Done)]
    tokens = ends[0].tokens if ends else 0
    decode_s = ends[0].decode_s if ends else 0.0
    report = {
        "variant": loaded_variant(),
        "features": cpu_features(),
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / decode_s if decode_s else 0.0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(report), flush=True)
    return 0 if tokens == PROBE_TOKENS else 1
