"""Random-weight Llama GGUF models for measuring speed where no real model can be brought.

The GPU machine cannot download anything and a call carries at most 64 MiB, so the default model
(98 MB) cannot travel. A model of the same shape and the same tensor types, with random weights
and the default model's real tokenizer, runs exactly as fast: its text is meaningless, its speed
is real.

    python packaging/cuda/model.py tokenizer MODEL.gguf OUT.json.gz   # here: ~0.5 MB
    python packaging/cuda/model.py write --shape smollm2 --tokenizer OUT.json.gz smollm2.gguf
    python packaging/cuda/model.py write --shape tinyllama --tokenizer OUT.json.gz tinyllama.gguf

Shapes: ``smollm2`` is SmolLM2-135M (30 layers, 576 wide, Q4_1 blocks with Q8_0 embeddings tied
to the output, like the default model's file); ``tinyllama`` is TinyLlama-1.1B (22 layers,
2048 wide, F16, untied output), with the SmolLM2 vocabulary. Needs the ``gguf`` package (numpy).
Not part of rbee: a measuring tool, run with any Python that has ``gguf``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

QK = 32  # weights per quantization block (Q4_1, Q8_0)


@dataclass(frozen=True)
class Shape:
    """What a Llama model looks like, and how its tensors are stored."""

    name: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    context: int
    weights: str  # "q4_1" (embeddings q8_0) or "f16"
    tied: bool  # the output projection is the token embedding (no output.weight)


SHAPES = {
    "smollm2": Shape("SmolLM2-135M-shaped", 30, 576, 1536, 9, 3, 8192, "q4_1", True),
    "tinyllama": Shape("TinyLlama-1.1B-shaped", 22, 2048, 5632, 32, 4, 2048, "f16", False),
}


def extract_tokenizer(model: str, out: str) -> None:
    """Save every ``tokenizer.*`` key of a GGUF file (type, element type and value) as gzip JSON."""
    import gguf

    reader = gguf.GGUFReader(model)
    saved: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = f.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value: Any = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                value = [f.parts[i].tolist()[0] for i in f.data]
            saved[key] = {"type": int(vtype), "sub": int(sub), "value": value}
        elif vtype == gguf.GGUFValueType.STRING:
            saved[key] = {"type": int(vtype), "value": bytes(f.parts[f.data[0]]).decode("utf-8")}
        else:
            saved[key] = {"type": int(vtype), "value": f.parts[f.data[0]].tolist()[0]}
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        json.dump(saved, fh)
    print(f"{len(saved)} tokenizer keys from {model} -> {out}", file=sys.stderr)


def q4_1(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """Random Q4_1 blocks (f16 scale d, f16 minimum m, 16 bytes of 4-bit weights): values in
    [-scale, +scale) evenly, finite by construction."""
    blocks = rows * cols // QK
    out = np.empty((blocks, 20), dtype=np.uint8)
    out[:, 0:2] = np.frombuffer(np.float16(2 * scale / 16).tobytes(), np.uint8)
    out[:, 2:4] = np.frombuffer(np.float16(-scale).tobytes(), np.uint8)
    out[:, 4:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return out.reshape(rows, cols // QK * 20)


def q8_0(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """Random Q8_0 blocks (f16 scale, 32 signed bytes)."""
    blocks = rows * cols // QK
    out = np.empty((blocks, 34), dtype=np.uint8)
    out[:, 0:2] = np.frombuffer(np.float16(scale / 127).tobytes(), np.uint8)
    out[:, 2:] = rng.integers(0, 256, size=(blocks, 32), dtype=np.uint8)
    return out.reshape(rows, cols // QK * 34)


def f16(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """Random normal F16 weights."""
    return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float16)


def write_model(shape: Shape, tokenizer: str, out: str, seed: int = 0) -> None:
    """Write a random-weight Llama GGUF of ``shape`` with the saved tokenizer."""
    import gguf

    with gzip.open(tokenizer, "rt", encoding="utf-8") as fh:
        tok: dict[str, Any] = json.load(fh)
    vocab = len(tok["tokenizer.ggml.tokens"]["value"])
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(shape.name + " (random weights)")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(3 if shape.weights == "q4_1" else 1)  # llama.cpp's MOSTLY_Q4_1 / F16
    for key, item in tok.items():
        vtype = gguf.GGUFValueType(item["type"])
        sub = gguf.GGUFValueType(item["sub"]) if "sub" in item else None
        writer.add_key_value(key, item["value"], vtype, sub)

    qtype = gguf.GGMLQuantizationType
    if shape.weights == "q4_1":

        def matrix(name: str, rows: int, cols: int) -> None:
            writer.add_tensor(name, q4_1(rng, rows, cols, 0.05), raw_dtype=qtype.Q4_1)

        embd = q8_0(rng, vocab, shape.n_embd, 0.05)
        writer.add_tensor("token_embd.weight", embd, raw_dtype=qtype.Q8_0)
    else:

        def matrix(name: str, rows: int, cols: int) -> None:
            writer.add_tensor(name, f16(rng, rows, cols, 0.02))

        writer.add_tensor("token_embd.weight", f16(rng, vocab, shape.n_embd, 0.02))
    ones = np.ones(shape.n_embd, dtype=np.float32)
    kv_width = shape.n_embd // shape.n_head * shape.n_head_kv
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        matrix(p + "attn_q.weight", shape.n_embd, shape.n_embd)
        matrix(p + "attn_k.weight", kv_width, shape.n_embd)
        matrix(p + "attn_v.weight", kv_width, shape.n_embd)
        matrix(p + "attn_output.weight", shape.n_embd, shape.n_embd)
        writer.add_tensor(p + "ffn_norm.weight", ones)
        matrix(p + "ffn_gate.weight", shape.n_ff, shape.n_embd)
        matrix(p + "ffn_up.weight", shape.n_ff, shape.n_embd)
        matrix(p + "ffn_down.weight", shape.n_embd, shape.n_ff)
    writer.add_tensor("output_norm.weight", ones)
    if not shape.tied:
        matrix("output.weight", vocab, shape.n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out} ({shape.name}, vocab {vocab})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``tokenizer`` or ``write``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="save a model's tokenizer keys")
    tok.add_argument("model")
    tok.add_argument("out")
    write = sub.add_parser("write", help="write a random-weight model")
    write.add_argument("--shape", choices=sorted(SHAPES), required=True)
    write.add_argument("--tokenizer", required=True)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        extract_tokenizer(args.model, args.out)
    else:
        write_model(SHAPES[args.shape], args.tokenizer, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
