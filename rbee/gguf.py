"""Read a GGUF file's header without loading the model.

The model catalog needs each file's architecture, quantization, context length and parameter
count when it imports a model. Asking llama.cpp for them would mean loading the whole model,
which is slow, and llama.cpp may not even be installed in the process doing the import. The GGUF
header holds all of it, so this module parses just the header with the standard library.

Every length read from the file is bounded before it is used, so a hostile or corrupt file can
only ever raise :class:`GGUFError`; it never allocates memory in proportion to a claimed size.
Array values (such as the tokenizer's vocabulary) are skipped by seeking, not materialised.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_STRING_BYTES = 1 << 20  # keys, string values, tensor names
MAX_KV_COUNT = 2_000_000
MAX_TENSOR_COUNT = 4_000_000
MAX_TENSOR_DIMS = 8
MAX_ARRAY_DEPTH = 8  # arrays of arrays of ...
FTYPE_GUESSED_BIT = 1024  # llama.cpp sets this when it guessed general.file_type

TYPE_STRING = 8
TYPE_ARRAY = 9
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_SCALARS = {t: struct.Struct("<" + c) for t, c in (_SCALAR_CODES | {12: "d"}).items()}
_U32 = _SCALARS[4]
_U64 = _SCALARS[10]
MIN_STRING_BYTES = 8  # the uint64 length of an empty string
MIN_ARRAY_BYTES = 12  # uint32 element type + uint64 count of an empty array
MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset

GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}

LLAMA_FTYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}


class GGUFError(Exception):
    """Raised when a file is not a GGUF file or its header is malformed/truncated."""


@dataclass(frozen=True)
class GGUFInfo:
    """What the catalog needs to know about a GGUF model, read from its header alone.

    ``file_type`` has llama.cpp's "guessed" bit masked off. ``quantization`` names it; when it is
    absent or unknown, it names the most common type among the 2-D tensors, else "unknown".
    ``parameter_count`` is ``general.parameter_count`` if present, else the sum over tensors of
    the product of their dims. ``metadata`` holds every scalar key/value pair; an array value is
    recorded only as its length (an ``int``).
    """

    version: int
    architecture: str
    name: str
    file_type: int | None
    quantization: str
    context_length: int | None
    parameter_count: int
    tensor_count: int
    has_chat_template: bool
    metadata: Mapping[str, object] = field(hash=False, repr=False)


class _Reader:
    """A buffered file plus our own offset and the file size, for bounds and error messages."""

    def __init__(self, f: BinaryIO, size_bytes: int) -> None:
        self._f = f
        self.size_bytes = size_bytes
        self.pos = 0

    def remaining(self) -> int:
        return self.size_bytes - self.pos

    def _need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise GGUFError(
                f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                f"but only {max(self.remaining(), 0)} remain"
            )

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        data = self._f.read(n)
        if len(data) != n:  # the file shrank under us
            raise GGUFError(f"truncated file: {what} at offset {self.pos} cut short")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self._f.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, s: struct.Struct, what: str) -> int | float | bool:
        value: int | float | bool = s.unpack(self.read(s.size, what))[0]
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(_U64, what))

    def string_length(self, what: str) -> int:
        start = self.pos
        n = self.u64(what)
        if n > MAX_STRING_BYTES:
            raise GGUFError(
                f"{what} at offset {start} claims {n} bytes, over the {MAX_STRING_BYTES} limit"
            )
        return n

    def string(self, what: str) -> str:
        n = self.string_length(what)
        start = self.pos
        try:
            return self.read(n, what).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at offset {start} is not valid UTF-8") from e

    def count(self, n: int, limit: int | None, min_bytes: int, what: str, start: int) -> None:
        """Check a claimed element count against a hard limit and against what the file holds."""
        if limit is not None and n > limit:
            raise GGUFError(f"{what} {n} at offset {start} is over the limit of {limit}")
        if n * min_bytes > self.remaining():
            raise GGUFError(
                f"truncated or corrupt file: {what} {n} at offset {start} needs at least "
                f"{n * min_bytes} bytes, but only {self.remaining()} remain"
            )


def _skip_array(r: _Reader, key: str, depth: int) -> int:
    """Skip an array value (its header included) and return its element count."""
    start = r.pos
    if depth >= MAX_ARRAY_DEPTH:
        raise GGUFError(f"array {key!r} at offset {start} is nested over {MAX_ARRAY_DEPTH} deep")
    elem_type = r.u32(f"element type of array {key!r}")
    n = r.u64(f"length of array {key!r}")
    scalar = _SCALARS.get(elem_type)
    if scalar is not None:
        min_bytes = scalar.size
    elif elem_type in (TYPE_STRING, TYPE_ARRAY):
        min_bytes = MIN_STRING_BYTES if elem_type == TYPE_STRING else MIN_ARRAY_BYTES
    else:
        raise GGUFError(f"array {key!r} at offset {start} has unknown element type {elem_type}")
    r.count(n, None, min_bytes, f"length of array {key!r}", start)
    if scalar is not None:
        r.skip(n * scalar.size, f"array {key!r}")
    elif elem_type == TYPE_STRING:
        what = f"string in array {key!r}"
        for _ in range(n):  # strings are variable length: walk them, keep nothing
            r.skip(r.string_length(what), what)
    else:
        for _ in range(n):
            _skip_array(r, key, depth + 1)
    return n


def _read_value(r: _Reader, value_type: int, key: str) -> object:
    scalar = _SCALARS.get(value_type)
    if scalar is not None:
        return r.scalar(scalar, f"value of {key!r}")
    if value_type == TYPE_STRING:
        return r.string(f"value of {key!r}")
    if value_type == TYPE_ARRAY:
        return _skip_array(r, key, 0)
    raise GGUFError(f"key {key!r} has unknown value type {value_type} at offset {r.pos - 4}")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_empty(value: object) -> str:
    return value if isinstance(value, str) else ""


def _parse(r: _Reader) -> GGUFInfo:
    magic = r.read(min(len(GGUF_MAGIC), r.size_bytes), "magic")
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: first 4 bytes are {magic!r}, expected {GGUF_MAGIC!r}")
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (big-endian? not supported)" if swapped in SUPPORTED_VERSIONS else ""
        raise GGUFError(f"unsupported GGUF version {version}{hint}; supported: 2, 3")
    start = r.pos
    tensor_count = r.u64("tensor count")
    kv_count = r.u64("key/value count")
    r.count(kv_count, MAX_KV_COUNT, MIN_KV_BYTES, "kv_count", start + 8)
    r.count(tensor_count, MAX_TENSOR_COUNT, MIN_TENSOR_INFO_BYTES, "tensor_count", start)

    metadata: dict[str, object] = {}
    for i in range(kv_count):
        key = r.string(f"key {i}")
        metadata[key] = _read_value(r, r.u32(f"value type of {key!r}"), key)

    param_sum = 0
    types_2d: Counter[int] = Counter()
    for i in range(tensor_count):
        start = r.pos
        r.skip(r.string_length(f"name of tensor {i}"), f"name of tensor {i}")
        n_dims = r.u32(f"n_dims of tensor {i}")
        if n_dims > MAX_TENSOR_DIMS:
            raise GGUFError(f"tensor {i} at offset {start}: n_dims {n_dims} > {MAX_TENSOR_DIMS}")
        dims = [r.u64(f"dim {d} of tensor {i}") for d in range(n_dims)]
        ggml_type = r.u32(f"type of tensor {i}")
        r.skip(_U64.size, f"data offset of tensor {i}")
        param_sum += math.prod(dims)
        if n_dims == 2 and ggml_type in GGML_TYPE_NAMES:
            types_2d[ggml_type] += 1

    architecture = _str_or_empty(metadata.get("general.architecture"))
    raw_ftype = _int_or_none(metadata.get("general.file_type"))
    file_type = None if raw_ftype is None else raw_ftype & ~FTYPE_GUESSED_BIT
    quantization = LLAMA_FTYPE_NAMES.get(file_type, "") if file_type is not None else ""
    if not quantization:
        common = types_2d.most_common(1)
        quantization = GGML_TYPE_NAMES[common[0][0]] if common else "unknown"
    declared_params = _int_or_none(metadata.get("general.parameter_count"))
    return GGUFInfo(
        version=version,
        architecture=architecture,
        name=_str_or_empty(metadata.get("general.name")),
        file_type=file_type,
        quantization=quantization,
        context_length=_int_or_none(metadata.get(f"{architecture}.context_length")),
        parameter_count=param_sum if declared_params is None else declared_params,
        tensor_count=tensor_count,
        has_chat_template=bool(_str_or_empty(metadata.get("tokenizer.chat_template"))),
        metadata=MappingProxyType(metadata),
    )


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFInfo:
    """:func:`read_gguf_info`, read once per version of the file (its size and modification
    time key the cache): walking a 50,000-token vocabulary takes about 0.1 s, and a hive needs
    a model's header on every request that names a ``file:`` model and for every estimate, on
    the loop that relays every token. Raises GGUFError as read_gguf_info does."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise GGUFError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from e
    return _cached_info(os.fspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_info(path: str, size: int, mtime_ns: int) -> GGUFInfo:
    return read_gguf_info(path)


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the header of the GGUF file at ``path``; the tensor data is never read.

    Raises :class:`GGUFError` if the file cannot be opened, is not a GGUF file, or has a
    malformed or truncated header.
    """
    try:
        with open(path, "rb") as f:
            return _parse(_Reader(f, os.fstat(f.fileno()).st_size))
    except OSError as e:
        raise GGUFError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from e
