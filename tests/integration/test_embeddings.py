"""Embedding jobs in the batched worker: a real hive, one worker with slots, the real model.

A vector is the mean of the tokens' last hidden states (the model declares no pooling); it is
checked against llama.cpp's own mean pooling of the same model (a copy whose GGUF header
declares mean pooling, read in one decode), and an embedding job shares the worker with a
running stream without stalling it."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest

from rbee.protocol.messages import Done, EnsureWorker, GenerateParams, StreamError, WorkerAssigned
from rbee.transport.sockets import DealerClient
from tests.gguf_edit import copy_with
from tests.helpers import hive_in_thread, keeper
from tests.integration.test_batching import Run, greedy, run_together
from tests.integration.test_hive_worker import LOAD_TIMEOUT_S, MODEL, ensure

CTX = 1024
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply."]


@pytest.fixture
def data_dir(tmp_path: Path, rbee_env: dict[str, str]) -> Path:
    return tmp_path / "data"


def ensure_small(client: DealerClient) -> WorkerAssigned:
    """A worker whose slots hold CTX tokens each."""
    rid = client.send(EnsureWorker(model=MODEL, n_ctx=CTX))
    for frame in client.replies(rid, LOAD_TIMEOUT_S):
        if isinstance(frame, WorkerAssigned):
            return frame
    raise AssertionError("no worker")


def vectors(done: Done) -> list[np.ndarray]:
    return [np.frombuffer(v, dtype="<f4") for v in done.vectors]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_vectors_have_the_models_width_and_are_deterministic(data_dir: Path) -> None:
    long_text = "word " * 1500  # longer than a slot's context (truncated) and many chunks
    with hive_in_thread(data_dir, parallel=2) as hive, keeper(hive) as (client, _):
        assigned = ensure_small(client)
        runs = [
            Run("j-embed-1", GenerateParams(prompt="", inputs=[*TEXTS, TEXTS[0]])),
            Run("j-embed-long", GenerateParams(prompt="", inputs=[long_text])),
            Run("j-embed-strict", GenerateParams(prompt="", inputs=[long_text], truncate=False)),
        ]
        run_together(hive, assigned.worker_id, runs)
    first, long, strict = runs
    assert isinstance(first.end, Done), first.end
    cat, kitten, market, cat_again = vectors(first.end)
    assert cat.shape == (576,) and np.isfinite(cat).all()
    assert np.array_equal(cat, cat_again)  # the same text twice, the same vector
    assert cosine(cat, kitten) > cosine(cat, market)
    assert first.end.prompt_tokens > 4 * 6 and not first.tokens  # read, nothing generated
    assert isinstance(long.end, Done) and len(long.end.vectors) == 1
    assert long.end.prompt_tokens == CTX  # cut to a slot's context
    assert isinstance(strict.end, StreamError) and strict.end.code == "INVALID_REQUEST"
    assert f"embeds at most {CTX}" in strict.end.message


def test_the_mean_equals_llama_cpps_own_mean_pooling(
    data_dir: Path, model_path: Path, tmp_path: Path
) -> None:
    """The same weights, their header declaring mean pooling: llama.cpp pools in one decode,
    rbee averages chunk by chunk; the vectors agree to float rounding."""
    pooled = copy_with(model_path, tmp_path / "pooled.gguf", {"llama.pooling_type": 1})
    text = "Embeddings map text to vectors. " * 12  # ~100 tokens: two chunks without pooling
    with hive_in_thread(data_dir, parallel=1) as hive, keeper(hive) as (client, _):
        runs = []
        for model in (MODEL, f"file:{pooled}"):
            assigned, _ = ensure(client, model)
            run = Run(f"j-{len(runs)}", GenerateParams(prompt="", inputs=[text]))
            run_together(hive, assigned.worker_id, [run], model=model)
            runs.append(run)
    ours, llama_cpp = (r.end for r in runs)
    assert isinstance(ours, Done) and isinstance(llama_cpp, Done), (ours, llama_cpp)
    assert ours.prompt_tokens == llama_cpp.prompt_tokens > 64
    (mean,), (pooled_vector,) = vectors(ours), vectors(llama_cpp)
    assert cosine(mean, pooled_vector) > 0.9999, cosine(mean, pooled_vector)
    assert np.linalg.norm(mean - pooled_vector) < 0.01 * np.linalg.norm(pooled_vector)


def test_an_embedding_job_does_not_stall_a_running_stream(data_dir: Path) -> None:
    """A stream runs; a job of long inputs arrives. Its chunks share the stream's steps, so
    the stream's tokens keep coming: no gap longer than a few chunks' time."""
    with hive_in_thread(data_dir, parallel=2) as hive, keeper(hive) as (client, _):
        assigned = ensure_small(client)
        stream = Run("j-stream", greedy(TEXTS[0], 120, ignore_eos=True))
        embed = Run("j-embed", GenerateParams(prompt="", inputs=["word " * 900] * 2))
        second = threading.Thread(target=run_together, args=(hive, assigned.worker_id, [embed]))

        def start_embedding(run: Run) -> None:
            if run.count >= 10 and not second.is_alive() and embed.end is None:
                second.start()

        run_together(hive, assigned.worker_id, [stream], start_embedding)
        second.join(120)
    assert isinstance(stream.end, Done) and stream.end.tokens == 120
    assert isinstance(embed.end, Done) and len(embed.end.vectors) == 2
    during = [b - a for a, b in itertools.pairwise(stream.arrived[10:])]
    print(f"\nlongest gap between the stream's frames while embedding: {max(during):.3f} s")
    assert max(during) < 1.0, during
