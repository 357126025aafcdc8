"""`rbee models …`: this machine's model catalog."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from rbee.catalog import Catalog, ModelEntry
from rbee.keeper.nodes import size, table
from rbee.paths import catalog_path


def import_model(path: str, name: str | None, out: TextIO = sys.stdout) -> ModelEntry:
    """Register a local GGUF in this machine's catalog."""
    catalog = Catalog(catalog_path())
    try:
        entry = catalog.add(Path(path), name)
    finally:
        catalog.close()
    out.write(
        f"imported {entry.name}: {entry.architecture} {entry.quantization}, "
        f"{entry.parameter_count / 1e6:.0f}M parameters, context {entry.context_length}, "
        f"{size(entry.size_bytes)}, sha256 {entry.sha256[:12]}…\n"
    )
    return entry


def list_models(out: TextIO = sys.stdout) -> list[ModelEntry]:
    """Print the catalog as a table (the bundled default model is added if installed)."""
    catalog = Catalog(catalog_path())
    try:
        catalog.ensure_default()
        entries = catalog.entries()
    finally:
        catalog.close()
    if not entries:
        out.write("no models yet: `rbee models import PATH` adds a GGUF file\n")
        return entries
    rows = [["NAME", "ARCH", "QUANT", "PARAMS", "CONTEXT", "SIZE", "PATH"]]
    for e in entries:
        rows.append(
            [
                e.name,
                e.architecture,
                e.quantization,
                f"{e.parameter_count / 1e6:.0f}M",
                str(e.context_length),
                size(e.size_bytes),
                e.path,
            ]
        )
    table(rows, out)
    return entries


def remove_model(name: str, out: TextIO = sys.stdout) -> None:
    """Forget a model; its file is left where it is."""
    catalog = Catalog(catalog_path())
    try:
        entry = catalog.remove(name)
    finally:
        catalog.close()
    out.write(f"removed {entry.name} from the catalog (the file {entry.path} was kept)\n")
