"""Where a worker runs and whether its model fits there: pure decisions, tested without a GPU.

The hive asks three questions before it spawns a worker:

1. **Which device?** ``choose_device`` turns a request (``cpu``, or ``cuda`` with an optional
   index or UUID) and the machine's Inventory (rbee.gpu) into a Placement. A request this hive
   cannot honour (a build without GPU support, no GPU, a device that does not exist) raises
   BACKEND_UNAVAILABLE listing what does exist. It never falls back to the CPU: a person who
   asked for a GPU and silently got a CPU would wait ten times longer and not know why.
2. **Does it fit?** ``estimate_memory`` adds up what llama.cpp will allocate, read from the GGUF
   header alone (the model is not loaded): the weights (the file's size, an upper bound: the
   token embeddings stay in RAM even with every layer on the GPU), the KV cache for every slot's
   context, llama.cpp's compute buffer for its worst-case batch, and the backend's own runtime
   (the CUDA context and cuBLAS on a GPU; the interpreter and libraries on the CPU). ``check_fits``
   refuses with INSUFFICIENT_VRAM or INSUFFICIENT_RAM, needed vs free in MiB, instead of
   letting llama.cpp run out of memory halfway through a load.
3. **How many slots?** A worker decodes ``slots`` jobs together, each with its own ``n_ctx``
   cells of KV cache. ``fit_slots`` takes the hive's ``--parallel N``, or with 0 (automatic, as
   llama-server's default) AUTO_SLOTS, fewer while the estimate does not fit, never below 1.

The compute-buffer formula follows llama.cpp's graph reservation without flash attention (the
llama-cpp-python default): the larger of the logits of a full batch and the attention scores of a
full batch against the whole context. On the CPU it matches llama.cpp's reported buffer exactly
for the default model (99.4 MiB at 2048 tokens, 166.4 MiB at 8192); GPU_RESULTS.md compares the
whole estimate with what the worker's process really held on an H100. With several slots the
attention is counted against all of them (slots × n_ctx cells): exact for a unified KV cache, an
upper bound for one split per sequence.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rbee.errors import BackendUnavailable, InsufficientRam, InsufficientVram
from rbee.gguf import GGUFError, read_gguf_header
from rbee.gpu import CudaDevice, Inventory, lent_label, placement_label

MIB = 1 << 20
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default cache type for K and V is f16
KV_CELL_PADDING = 256  # llama.cpp rounds the KV cache's cells up; count the worst case
N_UBATCH = 512  # llama-cpp-python's default physical batch, the graph llama.cpp reserves for
F32_BYTES = 4
CUDA_RUNTIME_BYTES = 600 * MIB  # CUDA context, cuBLAS, kernels: 587-589 MiB on an H100
CPU_RUNTIME_BYTES = 0  # the worker's baseline RSS exists before the model: not the model's cost
UNKNOWN_SHAPE_MARGIN_BYTES = 256 * MIB  # a header without the shape keys: weights + this
AUTO_SLOTS = 4  # slots per worker when the hive sets none (llama-server's automatic --parallel)


@dataclass(frozen=True)
class Lender:
    """A peer hive that lends memory (rbee.hive.peers): where to reach it, its key, its room."""

    node: str
    endpoint: str  # its front socket, tcp://HOST:PORT
    key: str  # its CURVE public key (this hive authorized it with the hive role)
    free_bytes: int
    gpu: bool = False  # it lends a GPU's memory (free_bytes is VRAM), else its RAM


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: the backend, and for CUDA the GPU (NVML index and UUID)."""

    backend: str  # "cpu" | "cuda"
    device: str  # "cpu", or the CUDA devices' NVML indexes as text, "0" or "0+1" (WorkerRecord)
    uuid: str = ""  # what CUDA_VISIBLE_DEVICES names for a CUDA worker ("GPU-…,GPU-…")
    name: str = "cpu"
    free_bytes: int = 0
    layers: tuple[int, ...] = ()  # layers per GPU, in ``device`` order; (): all on one GPU
    n_layers: int = 0  # llama.cpp's offloadable layers (0: unknown)
    on_cpu: bool = False  # a partial offload: the layers not on a GPU run on the CPU
    lenders: tuple[Lender, ...] = ()  # CPU here and ``layers`` in these hives' memory

    @property
    def index(self) -> int:
        """The NVML index of the (first) CUDA device (-1 on the CPU)."""
        return int(self.device.split("+")[0]) if self.backend == "cuda" else -1

    @property
    def gpu_layers(self) -> int:
        """llama.cpp's ``n_gpu_layers``: -1 for all of them, else how many go to the GPUs."""
        return sum(self.layers) if self.on_cpu else -1

    @property
    def label(self) -> str:
        """``cpu``, ``cuda:0 (NVIDIA H100 80GB HBM3)``, ``cuda:0+1 16+15/31 (…)``."""
        if self.lenders:
            return lent_label([lender.node for lender in self.lenders], self.layers, self.n_layers)
        if self.backend == "cpu":
            return "cpu"
        where = placement_label("cuda", self.device, self.layers, self.n_layers, self.on_cpu)
        return f"{where} ({self.name})"

    @property
    def memory_kind(self) -> str:
        """What memory it draws on, for messages."""
        return "RAM" if self.backend == "cpu" else "GPU memory"


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformer that size its KV cache and compute buffer."""

    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    """What a worker is expected to allocate, by part, in bytes."""

    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    runtime_bytes: int
    n_ctx: int  # per slot
    shape_known: bool = True
    slots: int = 1
    n_layers: int = 0  # llama.cpp's offloadable layers: the blocks and the output (0: unknown)

    @property
    def total_bytes(self) -> int:
        """Everything together."""
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.runtime_bytes

    @property
    def model_bytes(self) -> int:
        """What the model itself adds (the total less the runtime)."""
        return self.total_bytes - self.runtime_bytes

    def breakdown(self) -> str:
        """``weights 98 + KV cache 360 + compute 326 + runtime 600 MiB, 4 slots of 4096
        tokens``."""
        parts = f"weights {self.weights_bytes // MIB} + KV cache {self.kv_bytes // MIB} + " + (
            f"compute {self.compute_bytes // MIB}"
            if self.shape_known
            else f"margin {self.compute_bytes // MIB} (shape unknown)"
        )
        if self.runtime_bytes:
            parts += f" + runtime {self.runtime_bytes // MIB}"
        slots = f"{self.slots} slot" + ("s" if self.slots != 1 else "")
        return f"{parts} MiB, {slots} of {self.n_ctx} tokens"

    def describe(self) -> str:
        """``1,026 MiB (weights 98 + KV cache 90 + compute 99 + runtime 600 MiB, 1 slot of
        4096 tokens)``."""
        return f"{mib(self.total_bytes)} MiB ({self.breakdown()})"


def mib(n: int) -> str:
    """Bytes as whole MiB with thousands separators."""
    return f"{n // MIB:,}"


# --------------------------------------------------------------------------- device choice


def choose_device(
    inventory: Inventory, backend: str, device: str = "", node: str = ""
) -> Placement:
    """The device a worker for this request runs on, or BACKEND_UNAVAILABLE.

    ``device`` for ``cuda``: an NVML index ("0") or a UUID (a unique prefix will do); empty
    picks the GPU with the most free memory (the lowest index on a tie). For ``cpu`` it must be
    empty, "cpu" or "0".
    """
    where = f" on {node}" if node else ""
    if backend == "cpu":
        if device not in ("", "cpu", "0"):
            raise BackendUnavailable(
                f"the cpu backend has no device {device!r}{where}; it has: {inventory.describe()}",
                suggestion="leave out --device for the CPU, or add --backend cuda",
            )
        return Placement(backend="cpu", device="cpu", free_bytes=inventory.cpu.ram_free_bytes)
    if backend != "cuda":
        raise BackendUnavailable(
            f"no {backend} backend{where}; it has: {', '.join(inventory.backends)}",
            suggestion="use --backend cpu or --backend cuda",
        )
    if not inventory.gpu_offload:
        raise BackendUnavailable(
            f"this hive's llama.cpp build has no GPU support{where}, so it cannot run a model "
            f"on CUDA; it has: {inventory.describe()}",
            suggestion="install the CUDA build of llama-cpp-python (packaging/cuda/build.sh) "
            "and restart the hive, or use --backend cpu",
        )
    usable = [d for d in inventory.cuda if not d.note]
    if not usable:
        reason = inventory.cuda_note or "NVML lists no GPU"
        raise BackendUnavailable(
            f"no usable CUDA GPU{where} ({reason}); it has: {inventory.describe()}",
            suggestion="use --backend cpu, or another node (`rbee nodes` shows their backends)",
        )
    if device:
        chosen = _match(usable, device)
        if chosen is None:
            have = ", ".join(f"{d.index} ({d.uuid})" for d in usable)
            raise BackendUnavailable(
                f"no CUDA device {device!r}{where}; it has: {have}",
                suggestion="name a device by its index or UUID (`rbee nodes` lists them), "
                "or leave out --device to take the GPU with the most free memory",
            )
    else:
        chosen = max(usable, key=lambda d: (d.free_bytes, -d.index))
    return Placement(
        backend="cuda",
        device=str(chosen.index),
        uuid=chosen.uuid,
        name=chosen.name,
        free_bytes=chosen.free_bytes,
    )


def _match(devices: list[CudaDevice], wanted: str) -> CudaDevice | None:
    """The device an index or a UUID (or its unique prefix) names, else None."""
    if wanted.isdigit():
        return next((d for d in devices if d.index == int(wanted)), None)
    key = wanted.lower().removeprefix("gpu-")
    hits = [d for d in devices if len(key) >= 4 and _bare_uuid(d).startswith(key)]
    return hits[0] if len(hits) == 1 else None


def _bare_uuid(device: CudaDevice) -> str:
    return device.uuid.lower().removeprefix("gpu-")


def serves(worker_backend: str, worker_device: str, placement: Placement, device: str) -> bool:
    """Whether a worker already placed on (backend, device) answers this request.

    With no device named, any worker of the backend does; with one named, it must be that GPU.
    """
    if worker_backend != placement.backend:
        return False
    return not device or placement.backend == "cpu" or worker_device == placement.device


# --------------------------------------------------------------------------- memory


def model_shape(metadata: Mapping[str, object]) -> ModelShape | None:
    """The shape from a GGUF header's keys (``llama.block_count`` …), or None if absent."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return None

    def number(key: str, default: int | None = None) -> int | None:
        value = metadata.get(f"{arch}.{key}", default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    n_layers = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    if not n_layers or not n_embd or not n_head:
        return None
    n_head_kv = number("attention.head_count_kv", n_head) or n_head
    head_dim = n_embd // n_head
    vocab = number("vocab_size")
    if vocab is None:  # rbee.gguf records an array as its length: the token list's size
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0
    return ModelShape(
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=number("attention.key_length", head_dim) or head_dim,
        head_dim_v=number("attention.value_length", head_dim) or head_dim,
        n_ff=number("feed_forward_length", 4 * n_embd) or 4 * n_embd,
        n_vocab=vocab,
    )


def kv_cells(n_ctx: int) -> int:
    """The KV cache's cell count for a context (rounded up as llama.cpp may)."""
    return -(-n_ctx // KV_CELL_PADDING) * KV_CELL_PADDING


def kv_cache_bytes(shape: ModelShape, n_ctx: int) -> int:
    """K and V for every layer and cell: n_ctx × n_layers × n_head_kv × head_dim, K plus V, f16."""
    per_cell = shape.n_layers * shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v)
    return kv_cells(n_ctx) * per_cell * KV_BYTES_PER_ELEMENT


def compute_bytes(shape: ModelShape, n_ctx: int, n_ubatch: int = N_UBATCH, slots: int = 1) -> int:
    """llama.cpp's compute buffer for a full batch, without flash attention.

    The graph allocator reuses memory, so the buffer is its largest live set: either the
    logits of every token of the batch (n_vocab wide) or one layer's attention scores and mask
    (n_ctx × (n_head + 1) per token), each next to a few hidden-state-sized tensors. With
    ``slots``, the attention spans every slot's cells: the bound for a unified cache.
    """
    u = min(n_ubatch, max(1, slots * n_ctx))
    logits = u * (shape.n_vocab + 3 * shape.n_embd)
    cells = slots * kv_cells(n_ctx)
    attention = u * (cells * (shape.n_head + 1) + 3 * shape.n_embd + shape.n_ff)
    return F32_BYTES * max(logits, attention)


def estimate(
    metadata: Mapping[str, object] | None,
    file_bytes: int,
    n_ctx: int,
    backend: str,
    slots: int = 1,
) -> MemoryEstimate:
    """The memory one worker needs for a model with this header and size, with ``slots`` slots
    of ``n_ctx`` tokens each."""
    shape = model_shape(metadata) if metadata is not None else None
    return estimate_shape(shape, file_bytes, n_ctx, backend, slots)


def estimate_shape(
    shape: ModelShape | None, file_bytes: int, n_ctx: int, backend: str, slots: int = 1
) -> MemoryEstimate:
    """``estimate`` from a shape already read (None: the header did not say). The KV cache
    holds every slot's n_ctx cells; the compute buffer is sized for attention over all of them
    (an upper bound: with a cache split per sequence, a batch attends to one slot's cells)."""
    runtime = CUDA_RUNTIME_BYTES if backend == "cuda" else CPU_RUNTIME_BYTES
    if shape is None:
        return MemoryEstimate(
            weights_bytes=file_bytes,
            kv_bytes=0,
            compute_bytes=UNKNOWN_SHAPE_MARGIN_BYTES,
            runtime_bytes=runtime,
            n_ctx=n_ctx,
            shape_known=False,
            slots=slots,
        )
    return MemoryEstimate(
        weights_bytes=file_bytes,
        kv_bytes=slots * kv_cache_bytes(shape, n_ctx),
        compute_bytes=compute_bytes(shape, n_ctx, slots=slots),
        runtime_bytes=runtime,
        n_ctx=n_ctx,
        slots=slots,
        n_layers=shape.n_layers + 1,
    )


def slot_counts(parallel: int) -> list[int]:
    """The slot counts a new worker may get, most first: the hive's ``parallel``, or (0)
    AUTO_SLOTS down to 1."""
    return [parallel] if parallel > 0 else list(range(AUTO_SLOTS, 0, -1))


def first_fitting(
    estimate_for: Callable[[int], MemoryEstimate], free_bytes: int, counts: list[int]
) -> tuple[MemoryEstimate, bool]:
    """The estimate for the first of ``counts`` (slot counts, most first) that fits
    ``free_bytes``, and True; else the last one's, and False."""
    for slots in counts:
        needed = estimate_for(slots)
        if needed.total_bytes <= free_bytes:
            return needed, True
    return needed, False


def fit_slots(
    estimate_for: Callable[[int], MemoryEstimate], free_bytes: int, parallel: int = 0
) -> MemoryEstimate:
    """The estimate of a new worker with its slot count: ``parallel`` when set (``check_fits``
    refuses it if it does not fit, as for any worker), else (0) the most slots, AUTO_SLOTS at
    most, whose estimate fits ``free_bytes``; 1 when none does (and that is then refused)."""
    return first_fitting(estimate_for, free_bytes, slot_counts(parallel))[0]


def estimate_for_file(path: str, n_ctx: int, backend: str, slots: int = 1) -> MemoryEstimate:
    """``estimate`` for a model file, reading only its header (a synthetic model needs nothing).

    The header is read once per version of the file (rbee.gguf.read_gguf_header): a warm
    request pays only a stat.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return MemoryEstimate(0, 0, 0, 0, n_ctx, shape_known=False, slots=slots)
    if not stat.st_size:
        return MemoryEstimate(0, 0, 0, 0, n_ctx, shape_known=False, slots=slots)
    try:
        shape: ModelShape | None = model_shape(read_gguf_header(path).metadata)
    except GGUFError:
        shape = None
    return estimate_shape(shape, stat.st_size, n_ctx, backend, slots)


def check_fits(needed: MemoryEstimate, placement: Placement, model: str, node: str = "") -> None:
    """Refuse a worker that would not fit in the placement's free memory, saying both numbers."""
    if needed.total_bytes <= placement.free_bytes:
        return
    where = f" on {node}" if node else ""
    text = (
        f"{model} needs about {mib(needed.total_bytes)} MiB of {placement.memory_kind} on "
        f"{placement.label} ({needed.breakdown()}); {mib(placement.free_bytes)} MiB are "
        f"free{where}"
    )
    if placement.backend == "cpu":
        raise InsufficientRam(
            text, suggestion="stop other workers (`rbee ps`) or use a smaller quantization"
        )
    raise InsufficientVram(
        text,
        suggestion="stop other workers on that GPU (`rbee ps`), name another one with --device, "
        "or use a smaller quantization",
    )
