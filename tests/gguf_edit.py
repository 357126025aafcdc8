"""Copies of a GGUF file with header keys added or changed (gguf-py, llama.cpp's own library):
the default model declaring mean pooling, or carrying another chat template."""

from __future__ import annotations

from pathlib import Path

import gguf
import tqdm
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata


def copy_with(source: Path, target: Path, values: dict[str, str | int]) -> Path:
    """``source`` with each key of ``values`` set (a str as a string, an int as a uint32)."""
    tqdm.tqdm.monitor_interval = 0  # the writer's progress bar starts no monitor thread
    reader = gguf.GGUFReader(source, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    writer = gguf.GGUFWriter(target, arch=arch.contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    details = {
        key: MetadataDetails(
            gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32,
            value,
        )
        for key, value in values.items()
    }
    copy_with_new_metadata(reader, writer, details, [])
    return target
