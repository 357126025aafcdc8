"""Tests for rbee.hub.layout: where files live, disk checks, part files and their cleanup."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from rbee.errors import InsufficientDisk, InvalidRequest
from rbee.hub import layout
from rbee.hub.files import RemoteFile
from rbee.hub.layout import (
    check_disk,
    clean_stale_parts,
    local_path,
    part_path,
    remaining_bytes,
    sidecar_path,
    write_sidecar,
)

COMMIT = "c" * 40
SHA = "5" * 64


def remote(filename: str = "sub/m-Q8_0.gguf", size: int = 100, **kw: object) -> RemoteFile:
    fields: dict[str, object] = {
        "repo": "acme/m-GGUF",
        "filename": filename,
        "commit": COMMIT,
        "size": size,
        "sha256": SHA,
        "url": "http://hub/x",
    }
    fields.update(kw)
    return RemoteFile(**fields)  # type: ignore[arg-type]


def test_local_path_layout(tmp_path: Path) -> None:
    path = local_path(tmp_path, remote())
    assert path == tmp_path.resolve() / "hf" / "acme--m-GGUF" / COMMIT / "sub" / "m-Q8_0.gguf"
    assert part_path(path).name == "m-Q8_0.gguf.part"
    assert sidecar_path(path).name == "m-Q8_0.gguf.part.json"


def test_local_path_refuses_a_symlink_out_of_models_dir(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    models = tmp_path / "models"
    (models / "hf").mkdir(parents=True)
    (models / "hf" / "acme--m-GGUF").symlink_to(outside)
    with pytest.raises(InvalidRequest, match="outside"):
        local_path(models, remote())


def test_check_disk_names_both_numbers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(layout, "disk_free_bytes", lambda path: 1000)
    with pytest.raises(InsufficientDisk) as excinfo:
        check_disk(tmp_path, 5000, "pulling x")
    need = 5000 + layout.DISK_MARGIN_BYTES
    assert f"needs {need} bytes" in excinfo.value.message
    assert "only 1000 are free" in excinfo.value.message
    monkeypatch.setattr(layout, "disk_free_bytes", lambda path: need)
    check_disk(tmp_path, 5000, "pulling x")


def test_disk_free_bytes_of_a_missing_folder(tmp_path: Path) -> None:
    assert layout.disk_free_bytes(tmp_path / "not" / "yet") > 0


def test_remaining_bytes(tmp_path: Path) -> None:
    r = remote(size=100)
    dest = local_path(tmp_path, r)
    assert remaining_bytes(tmp_path, r) == 100
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(b"x" * 30)
    assert remaining_bytes(tmp_path, r) == 70
    dest.write_bytes(b"x" * 100)
    assert remaining_bytes(tmp_path, r) == 0


def _part(tmp_path: Path, r: RemoteFile, size: int, *, sidecar: bool = True) -> Path:
    dest = local_path(tmp_path, r)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_path(dest).write_bytes(b"x" * size)
    if sidecar:
        write_sidecar(dest, r)
    return dest


def test_clean_stale_parts(tmp_path: Path) -> None:
    fresh = _part(tmp_path, remote("fresh.gguf"), 10)
    old = _part(tmp_path, remote("old.gguf"), 10)
    os.utime(part_path(old), (1, 1))
    no_sidecar = _part(tmp_path, remote("lonely.gguf"), 10, sidecar=False)
    too_big = _part(tmp_path, remote("big.gguf", size=5), 10)
    moved = _part(tmp_path, remote("moved.gguf"), 10)
    sidecar_path(moved).write_text(json.dumps({**json.loads(sidecar_path(fresh).read_text())}))
    garbled = _part(tmp_path, remote("garbled.gguf"), 10)
    sidecar_path(garbled).write_text('{"repo": null, "version": 1}')
    orphan = local_path(tmp_path, remote("orphan.gguf"))
    sidecar_path(orphan).write_text("{}")
    kept = _part(tmp_path, remote("kept.gguf"), 10, sidecar=False)

    removed = clean_stale_parts(tmp_path, 3600, keep=frozenset({part_path(kept)}))

    assert part_path(fresh).exists() and sidecar_path(fresh).exists()
    assert part_path(kept).exists()
    for dest in (old, no_sidecar, too_big, moved, garbled):
        assert not part_path(dest).exists(), dest
        assert not sidecar_path(dest).exists(), dest
    assert not sidecar_path(orphan).exists()
    assert part_path(old) in removed and sidecar_path(orphan) in removed
    assert clean_stale_parts(tmp_path / "nothing-here") == []


def test_clean_stale_parts_spares_a_part_being_written(tmp_path: Path) -> None:
    dest = _part(tmp_path, remote("busy.gguf"), 10, sidecar=False)
    with part_path(dest).open("ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert clean_stale_parts(tmp_path, 0) == []
    assert clean_stale_parts(tmp_path, 0) == [part_path(dest)]
