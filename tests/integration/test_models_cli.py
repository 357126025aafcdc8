"""`rbee models list --json` and `rbee models show`, run as a person runs them: the real CLI,
a real catalog (SQLite), the bundled model's real GGUF header."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rbee.protocol.messages import DEFAULT_MODEL
from tests.helpers import run_rbee


def test_list_json_and_show_agree_with_the_file(
    rbee_env: dict[str, str], model_path: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "tiny.gguf"
    shutil.copyfile(model_path, copy)
    imported = run_rbee("models", "import", str(copy), "--name", "tiny", env=rbee_env)
    assert imported.returncode == 0, imported.stderr
    listed = run_rbee("models", "list", "--json", env=rbee_env)
    assert listed.returncode == 0, listed.stderr
    entries = {e["name"]: e for e in json.loads(listed.stdout)}
    assert {"tiny", DEFAULT_MODEL} <= entries.keys()
    tiny = entries["tiny"]
    assert tiny["path"] == str(copy) and tiny["size_bytes"] == copy.stat().st_size
    assert tiny["provider"] == "file" and tiny["repo"] is None  # not recorded: null, not ""

    shown = run_rbee("models", "show", "tiny", "--json", env=rbee_env)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["name"] == "tiny" and record["gguf_error"] is None
    gguf = record["gguf"]
    assert (gguf["embedding_length"], gguf["block_count"], gguf["vocab_size"]) == (576, 30, 49152)
    assert "<|im_start|>" in gguf["chat_template"] and not gguf["template_mentions_tools"]

    text = run_rbee("models", "show", "tiny", env=rbee_env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["name", "tiny"] and "embedding     576" in text.stdout
    assert any(line.startswith("chat template (does not mention tools):") for line in lines)


def test_show_errors_say_what_to_do(
    rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    unknown = run_rbee("models", "show", "no-such-model", env=rbee_env)
    assert unknown.returncode != 0 and "MODEL_NOT_FOUND" in unknown.stderr
    assert "rbee models list" in unknown.stderr
    broken = tmp_path / "broken.gguf"
    shutil.copyfile(model_path, broken)
    assert run_rbee("models", "import", str(broken), env=rbee_env).returncode == 0
    broken.write_bytes(b"GGUF" + b"\0" * 20)  # the file changed under the catalog
    shown = run_rbee("models", "show", "broken", env=rbee_env)
    assert shown.returncode != 0 and "INVALID_MODEL" in shown.stderr
    assert "name          broken" in shown.stdout  # what the catalog knows is still shown
