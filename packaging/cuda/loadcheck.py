"""Load a model on the GPU the way a worker process does (pyzmq already loaded), and generate.

A CUDA build of llama.cpp crashed (SIGSEGV in std::regex while loading the vocabulary) in a
process where pyzmq was loaded before the model, which every rbee worker is; llama-cpp-python on
its own did not (GPU_RESULTS.md). prove_h100.sh runs this first, so a build that still has the
problem is named before any measurement.

    python packaging/cuda/loadcheck.py MODEL.gguf      # prints "load ok: …", exit 0
"""

from __future__ import annotations

import sys

import zmq

ctx = zmq.Context()
sock = ctx.socket(zmq.PAIR)

import llama_cpp  # noqa: E402  (after zmq on purpose)

llm = llama_cpp.Llama(
    model_path=sys.argv[1],
    n_ctx=2048,
    n_gpu_layers=-1,
    split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE,
    verbose=False,
)
tokens = llm.tokenize(b"Hello there", add_bos=True, special=True)
out = [t for _, t in zip(range(4), llm.generate(tokens, temp=0.0), strict=False)]
print(f"load ok: {len(out)} tokens generated with pyzmq {zmq.__version__} loaded first")
sock.close()
ctx.term()
