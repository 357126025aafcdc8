"""Embedding jobs in the batch loop: one vector per input text, read a chunk per step.

An embedding job takes a slot like any job (the hive counts it, a cancel ends it), but it
generates nothing: each step reads one chunk of its current input with llama.cpp's embeddings
output on, in a decode of its own, so the streams in the other slots wait at most one chunk,
as they wait for a prefill chunk. A model that declares a pooling (an embedding model: mean,
CLS, last token) pools in llama.cpp, which needs the whole input in one decode; a generative
model declares none, and its vector is the mean of its tokens' last hidden states (what
llama-server gives with ``--pooling mean``). The worker sends raw vectors; the gateway
normalizes them where the API does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

CHUNK_TOKENS = 64  # with embeddings on, llama.cpp also computes every token's logits


class EmbeddingModel(Protocol):
    """What an embedding job needs of the loaded model (rbee.worker.engine.Engine)."""

    @property
    def pooled(self) -> bool: ...

    def embed(self, seq: int, tokens: Sequence[int], first_pos: int) -> np.ndarray: ...
    def forget(self, seq: int, from_pos: int) -> bool: ...


class Embedding:
    """One job's inputs (tokenized) and how far it has read them."""

    def __init__(self, inputs: list[list[int]]) -> None:
        self.inputs = inputs
        self.index = 0  # the input being read
        self.pos = 0  # its tokens read so far
        self.total: np.ndarray | None = None  # their sum (a model without pooling)
        self.vectors: list[bytes] = []

    @property
    def tokens(self) -> int:
        """Every input's tokens: the job's prompt tokens."""
        return sum(map(len, self.inputs))

    def step(self, model: EmbeddingModel, seq: int) -> bool:
        """Read the next chunk into sequence ``seq``; whether every input has its vector."""
        tokens = self.inputs[self.index]
        if self.pos == 0:
            model.forget(seq, 0)
        size = len(tokens) if model.pooled else CHUNK_TOKENS
        chunk = tokens[self.pos : self.pos + size]
        out = model.embed(seq, chunk, self.pos)
        self.pos += len(chunk)
        if not model.pooled:
            self.total = out if self.total is None else self.total + out
        if self.pos < len(tokens):
            return False
        vector = out if model.pooled or self.total is None else self.total / len(tokens)
        self.vectors.append(vector.astype("<f4").tobytes())
        model.forget(seq, 0)
        self.index, self.pos, self.total = self.index + 1, 0, None
        return self.index == len(self.inputs)
