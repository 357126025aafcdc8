"""Hub models through the rbee command: `rbee models pull` and `rbee infer -m hf:…` against a
local server speaking the Hub's HTTP API, serving the real default model's bytes."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee.errors import ExitCode
from tests.e2e.test_lifecycle import running_hive
from tests.helpers import rbee_cmd, run_rbee
from tests.hub_server import FakeHub, FakeRepo

REPO = "rbee-test/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def model_bytes(model_path: Path) -> bytes:
    return model_path.read_bytes()


@pytest.fixture
def hub(model_bytes: bytes, rbee_env: dict[str, str]) -> Iterator[FakeHub]:
    repos = {REPO: FakeRepo(files={FILE: model_bytes, "README.md": b"# model\n"})}
    with FakeHub(repos) as server:
        rbee_env["HF_ENDPOINT"] = server.endpoint
        rbee_env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        rbee_env.pop("HF_TOKEN", None)
        yield server


def test_pull_then_infer_and_pull_again(hub: FakeHub, rbee_env: dict[str, str]) -> None:
    pulled = run_rbee("models", "pull", f"hf:{REPO}", env=rbee_env)
    assert pulled.returncode == 0, pulled.stderr
    assert "[download] 100%" in pulled.stderr and "downloaded hf:" in pulled.stderr
    assert len(hub.file_gets(REPO, FILE)) == 1
    listed = run_rbee("models", "list", env=rbee_env).stdout
    name = re.search(r"^(smollm2-135m-instruct\.q4_1)\s+llama\s+Q4_1", listed, re.M)
    assert name is not None, listed
    again = run_rbee("models", "pull", f"hf:{REPO}:Q4_1", env=rbee_env)
    assert again.returncode == 0 and "already had" in again.stderr, again.stderr
    assert len(hub.file_gets(REPO, FILE)) == 1, "a model is downloaded once per hive"
    ran = run_rbee("infer", "-m", f"hf:{REPO}", "-t", "0", "-n", "12", "Hello", env=rbee_env)
    assert ran.returncode == 0 and "[done] 12 tokens" in ran.stderr, ran.stderr
    assert "[download]" not in ran.stderr
    by_name = run_rbee("infer", "-m", name.group(1), "-t", "0", "-n", "12", "Hello", env=rbee_env)
    assert by_name.stdout == ran.stdout
    removed = run_rbee("models", "rm", name.group(1), env=rbee_env)
    assert removed.returncode == 0 and "deleted" in removed.stdout, removed.stdout
    assert not list((Path(rbee_env["RBEE_DATA_DIR"]) / "models").rglob("*.gguf"))


def test_infer_pulls_with_progress(hub: FakeHub, rbee_env: dict[str, str]) -> None:
    ran = run_rbee("infer", "-m", f"hf:{REPO}/{FILE}", "-t", "0", "-n", "8", "Hi", env=rbee_env)
    assert ran.returncode == 0, ran.stderr
    phases = [line.split("]")[0] + "]" for line in ran.stderr.splitlines()]
    assert phases.index("[download]") < phases.index("[worker]") < phases.index("[ready]")


def test_hub_errors_have_codes(hub: FakeHub, rbee_env: dict[str, str]) -> None:
    missing = run_rbee("models", "pull", "hf:rbee-test/no-such-repo", env=rbee_env)
    assert missing.returncode == ExitCode.MODEL and "MODEL_NOT_FOUND" in missing.stderr
    no_quant = run_rbee("models", "pull", f"hf:{REPO}:Q8_0", env=rbee_env)
    assert no_quant.returncode == ExitCode.MODEL, no_quant.stderr
    assert FILE in no_quant.stderr, "the files that are there are listed"
    bad = run_rbee("models", "pull", "hf:../etc/passwd", env=rbee_env)
    assert bad.returncode == ExitCode.USAGE and "INVALID_REQUEST" in bad.stderr
    hub.faults.corrupt = {FILE}
    corrupt = run_rbee("models", "pull", f"hf:{REPO}", env=rbee_env)
    assert corrupt.returncode == ExitCode.DOWNLOAD and "CHECKSUM_MISMATCH" in corrupt.stderr
    assert "q4_1" not in run_rbee("models", "list", env=rbee_env).stdout
    assert not list((Path(rbee_env["RBEE_DATA_DIR"]) / "models").rglob("*.gguf*"))


def test_a_hive_killed_mid_download_resumes(hub: FakeHub, rbee_env: dict[str, str]) -> None:
    size = len(hub.repos[REPO].files[FILE])
    hub.faults.stall_after_bytes, hub.faults.stall_s = size // 2, 60.0
    with running_hive(rbee_env) as hive:
        puller = subprocess.Popen(
            rbee_cmd("models", "pull", f"hf:{REPO}"),
            env=rbee_env,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while hub.bytes_served(REPO, FILE) < size // 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the first half is written to the part file
        hive.send_signal(signal.SIGKILL)
        hive.wait(10)
        _, err = puller.communicate(timeout=30)
        assert puller.returncode == ExitCode.NETWORK and "HIVE_LOST" in err, err
    parts = list((Path(rbee_env["RBEE_DATA_DIR"]) / "models").rglob("*.part"))
    assert parts and parts[0].stat().st_size >= size // 2
    hub.unstall.set()
    with running_hive(rbee_env):
        resumed = run_rbee("models", "pull", f"hf:{REPO}", env=rbee_env)
    assert resumed.returncode == 0, resumed.stderr
    ranges = [r.range for r in hub.file_gets(REPO, FILE)]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1] != "bytes=0-", ranges
    assert hub.bytes_served(REPO, FILE) < size * 1.5
