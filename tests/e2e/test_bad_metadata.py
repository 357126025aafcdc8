"""Model metadata beyond what the wire carries (issue: one bad file hid a whole hive): refused
when a file is imported, and cut to fit when an older catalog already holds such an entry."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rbee.catalog import Catalog, describe_file
from rbee.errors import ExitCode
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import PROTOCOL_VERSION, HiveStatus, ModelInfo
from rbee.protocol.schema import fitted
from tests.e2e.test_lifecycle import running_hive
from tests.helpers import run_rbee
from tests.unit.test_gguf import BASE_KVS, BASE_TENSORS, gguf_bytes


def test_a_file_whose_metadata_the_wire_cannot_carry_is_refused_at_import(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    kvs = [(k, t, "x" * 65 if k == "general.architecture" else v) for k, t, v in BASE_KVS]
    bad = tmp_path / "long-arch.gguf"
    bad.write_bytes(gguf_bytes(kvs, BASE_TENSORS))
    imported = run_rbee("models", "import", str(bad), env=rbee_env)
    assert imported.returncode == ExitCode.MODEL, imported.stdout + imported.stderr
    assert "INVALID_MODEL" in imported.stderr and "architecture is 65 characters" in imported.stderr
    listed = run_rbee("models", "list", env=rbee_env)
    assert "long-arch" not in listed.stdout


def test_an_entry_an_older_rbee_recorded_never_hides_the_hive(
    rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    """A catalog row with a 65-character architecture and a huge context length (as an older
    rbee let in): the hive stays listed, reports the entry cut to fit, and serves."""
    catalog = Catalog(Path(rbee_env["RBEE_DATA_DIR"]) / "catalog.db")
    row = describe_file(model_path, "old-entry")
    record = {**row.__dict__, "architecture": "\x1b]0;pwned\x07" + "a" * 64}
    record["context_length"] = 2**62
    catalog.db.table("models").upsert(record, pk="name")
    catalog.close()
    with running_hive(rbee_env):
        listed = run_rbee("nodes", "--json", env=rbee_env)
        assert listed.returncode == 0, listed.stderr
        nodes = json.loads(listed.stdout)
        assert nodes and not str(nodes[0]["state"]).startswith("unreachable"), nodes
        ran = run_rbee("infer", "-m", "old-entry", "-t", "0", "-n", "4", "Hi", env=rbee_env)
        assert ran.returncode == 0 and "ephemeral" not in ran.stderr, ran.stderr


def test_any_metadata_fits_a_status_reply_that_decodes() -> None:
    """Random lengths, characters and integer sizes: the fitted record is always valid, and a
    Status reply carrying it always encodes and decodes."""
    rng = random.Random(7)
    alphabet = "aé\x00\x1b\n€𝄞 "
    for _ in range(300):

        def text() -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 63, 65, 5000))))

        def number() -> int:
            return rng.choice((-1, 0, 2**31, 2**62, 2**63, 2**70))

        info, _ = fitted(
            ModelInfo,
            {
                "name": text(),
                "path": text(),
                "size_bytes": number(),
                "architecture": text(),
                "quantization": text(),
                "context_length": number(),
                "parameter_count": number(),
            },
        )
        status = HiveStatus(
            node="n",
            rbee_version="0",
            protocol_version=PROTOCOL_VERSION,
            workers=[],
            models=[info],
            cpu_count=1,
            ram_total_bytes=1,
            ram_free_bytes=1,
            disk_free_bytes=1,
        )
        assert decode(encode(status)).frame == status
