"""Where downloaded Hub files live on disk, their part files, and cleaning up after them.

Layout under a models directory::

    <models_dir>/hf/<ORG>--<REPO>/<COMMIT>/<FILE>             a verified file
    <models_dir>/hf/<ORG>--<REPO>/<COMMIT>/<FILE>.part        bytes received so far
    <models_dir>/hf/<ORG>--<REPO>/<COMMIT>/<FILE>.part.json   which remote bytes the part holds

``FILE`` keeps the repo's subfolders (the parts of a split model stay side by side, as
llama.cpp needs). Repo names cannot contain ``--`` (the Hub forbids it), so a folder name maps
back to exactly one repo, and the commit folder keeps revisions apart. Every path is resolved
and checked to stay inside ``<models_dir>/hf``; the names were validated before (refs.py), this
is the second lock on the door. Only verified files ever appear without a suffix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rbee.errors import InsufficientDisk, InvalidRequest, RbeeError
from rbee.hub.files import RemoteFile

HUB_DIR = "hf"  # under models_dir: everything rbee.hub writes
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.json"
SIDECAR_VERSION = 1
DISK_MARGIN_BYTES = 64 * 1024 * 1024  # left free beyond the download itself
STALE_PART_AGE_S = 7 * 24 * 3600.0  # a part untouched this long is given up

IDENTITY_KEYS = ("version", "repo", "filename", "commit", "size", "sha256", "blob_id")


def local_path(models_dir: Path, remote: RemoteFile) -> Path:
    """Where ``remote`` lives under ``models_dir``; InvalidRequest if it would land outside."""
    base = (models_dir / HUB_DIR).resolve()
    org, _, name = remote.repo.partition("/")
    path = (base / f"{org}--{name}" / remote.commit / remote.filename).resolve()
    if not path.is_relative_to(base) or len(path.relative_to(base).parts) < 3:
        raise InvalidRequest(f"{remote.repo}/{remote.filename} would be stored outside {base}")
    return path


def part_path(dest: Path) -> Path:
    """The part file that collects ``dest``'s bytes."""
    return dest.with_name(dest.name + PART_SUFFIX)


def sidecar_path(dest: Path) -> Path:
    """The sidecar that says which remote bytes ``dest``'s part file holds."""
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def is_complete(dest: Path, remote: RemoteFile) -> bool:
    """Whether ``dest`` holds ``remote`` (files reach their final path only once verified)."""
    try:
        return dest.is_file() and dest.stat().st_size == remote.size
    except OSError:
        return False


def remaining_bytes(models_dir: Path, remote: RemoteFile) -> int:
    """How many bytes of ``remote`` are still to be fetched (a part file counts as fetched)."""
    dest = local_path(models_dir, remote)
    if is_complete(dest, remote):
        return 0
    with contextlib.suppress(OSError):
        return max(remote.size - part_path(dest).stat().st_size, 0)
    return remote.size


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(directory: Path, needed_bytes: int, what: str) -> None:
    """InsufficientDisk unless ``needed_bytes`` plus DISK_MARGIN_BYTES are free there."""
    need = needed_bytes + DISK_MARGIN_BYTES
    free = disk_free_bytes(directory)
    if free < need:
        raise InsufficientDisk(
            f"{what} needs {need} bytes free on {directory} ({_gib(need)} with a "
            f"{_gib(DISK_MARGIN_BYTES)} margin), but only {free} are free ({_gib(free)})",
            suggestion="free some space, or remove models with `rbee models rm`",
        )


def identity(remote: RemoteFile) -> dict[str, Any]:
    """What a sidecar must record for a part to be resumed: the same remote bytes. Not the URL:
    a mirror serving the same commit and hash serves the same bytes."""
    return {
        "version": SIDECAR_VERSION,
        "repo": remote.repo,
        "filename": remote.filename,
        "commit": remote.commit,
        "size": remote.size,
        "sha256": remote.sha256,
        "blob_id": remote.blob_id,
    }


def write_sidecar(dest: Path, remote: RemoteFile) -> None:
    """Record (atomically) which remote bytes ``dest``'s part file is collecting."""
    path = sidecar_path(dest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**identity(remote), "url": remote.url}), encoding="utf-8")
    os.replace(tmp, path)


def read_sidecar(dest: Path) -> dict[str, Any] | None:
    """The identity fields of ``dest``'s sidecar; None if it is missing or unreadable."""
    try:
        data = json.loads(sidecar_path(dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {key: data.get(key) for key in IDENTITY_KEYS}


def clean_stale_parts(
    models_dir: Path,
    max_age_s: float = STALE_PART_AGE_S,
    *,
    keep: frozenset[Path] = frozenset(),
    now: float | None = None,
) -> list[Path]:
    """Delete part files untouched for ``max_age_s`` or whose sidecar does not describe them,
    and sidecars without a part; returns what it deleted.

    A part that a transfer holds (its lock, in any process) or that ``keep`` names (resolved
    paths) is left alone, so this is safe to run while downloads are going on.
    """
    now = time.time() if now is None else now
    root = (models_dir / HUB_DIR).resolve()
    if not root.is_dir():
        return []
    removed: list[Path] = []
    for part in sorted(root.rglob(f"*{PART_SUFFIX}")):
        dest = part.with_name(part.name.removesuffix(PART_SUFFIX))
        if part in keep or not part.is_file():
            continue
        with contextlib.suppress(OSError), part.open("rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: being written
            if now - part.stat().st_mtime > max_age_s or not _sidecar_describes(models_dir, dest):
                removed += unlink(part, sidecar_path(dest))
    for pattern in (f"*{SIDECAR_SUFFIX}", f"*{SIDECAR_SUFFIX}.tmp"):
        for sidecar in sorted(root.rglob(pattern)):
            dest = sidecar.with_name(sidecar.name.split(SIDECAR_SUFFIX)[0])
            if part_path(dest) not in keep and not part_path(dest).exists():
                removed += unlink(sidecar)
    return removed


def unlink(*paths: Path) -> list[Path]:
    """Delete files that exist; returns those deleted."""
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _sidecar_describes(models_dir: Path, dest: Path) -> bool:
    """Whether ``dest``'s sidecar names a remote file that belongs at ``dest``, and the part
    is no bigger than that file."""
    data = read_sidecar(dest)
    if data is None or data["version"] != SIDECAR_VERSION:
        return False
    try:
        remote = RemoteFile(
            data["repo"],
            data["filename"],
            data["commit"],
            data["size"],
            data["sha256"],
            "",
            data["blob_id"],
        )
        return local_path(models_dir, remote) == dest.resolve() and (
            part_path(dest).stat().st_size <= remote.size
        )
    except (RbeeError, TypeError, AttributeError, OSError):  # a sidecar edited by hand
        return False


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"
