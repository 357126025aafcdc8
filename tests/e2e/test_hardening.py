"""What a new user and an attacker found (the hardening issue), met through the CLI as a person
meets it: each failure ends in a coded error with a hint, never a traceback, and loses nothing."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from rbee.catalog import DEFAULT_MODEL, Catalog, describe_file
from rbee.errors import ExitCode
from rbee.terminal import CELL_CHARS
from tests.e2e.test_lifecycle import running_hive
from tests.helpers import rbee_cmd, run_rbee
from tests.unit.test_gguf import BASE_KVS, BASE_TENSORS, F32_T, U64, gguf_bytes

HUGE_CONTEXT = [
    (k, U64, 2**63) if k.endswith("context_length") else (k, t, v) for k, t, v in BASE_KVS
]


def assert_coded(done: subprocess.CompletedProcess[str], exit_code: int, *texts: str) -> None:
    """Ended with ``exit_code``, said every one of ``texts`` on stderr, and no traceback."""
    assert done.returncode == exit_code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for text in texts:
        assert text in done.stderr, done.stderr


def test_text_that_is_not_utf8_is_refused_by_name(rbee_env: dict[str, str]) -> None:
    env = rbee_env  # Python keeps the bytes of argv that are not UTF-8 as surrogates
    as_arg = run_rbee("infer", b"hi \xff".decode("utf-8", "surrogateescape"), env=env)
    assert_coded(as_arg, ExitCode.USAGE, "INVALID_REQUEST: PROMPT is not UTF-8 text (the byte 0xff")
    model = run_rbee("infer", "-m", "\udcfe", "hi", env=env)
    assert_coded(model, ExitCode.USAGE, "--model is not UTF-8 text (the byte 0xfe")
    piped = subprocess.run(
        rbee_cmd("infer", "-"), env=env, input=b"ok \xc3(", capture_output=True, timeout=60
    )
    err = piped.stderr.decode()
    assert piped.returncode == ExitCode.USAGE and "Traceback" not in err, err
    assert "stdin is not UTF-8 text (the byte 0xc3 at offset 3)" in err and "iconv" in err


@pytest.mark.parametrize(
    ("kvs", "tensors", "what"),
    [
        (
            HUGE_CONTEXT,
            BASE_TENSORS,
            "context_length is 9223372036854775808",
        ),
        (BASE_KVS, [("token_embd.weight", [2**62, 4], F32_T)], "parameter_count is"),
    ],
    ids=["context-2^63", "dims-2^62"],
)
def test_integers_sqlite_cannot_hold_are_refused_at_import(
    rbee_env: dict[str, str], tmp_path: Path, kvs: list, tensors: list, what: str
) -> None:
    path = tmp_path / "huge.gguf"
    path.write_bytes(gguf_bytes(kvs, tensors))
    done = run_rbee("models", "import", str(path), env=rbee_env)
    assert_coded(done, ExitCode.MODEL, "INVALID_MODEL", what)


def test_a_port_in_use_or_an_address_not_here(rbee_env: dict[str, str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(rbee_env["RBEE_HIVE_PORT"])))
        holder.listen()
        taken = run_rbee("hive", "--host", "127.0.0.1", env=rbee_env, timeout=60)
        assert_coded(taken, ExitCode.NETWORK, "CANNOT_LISTEN", "Address already in use", "--port")
        port = holder.getsockname()[1]
        served = run_rbee("serve", "--listen", f"127.0.0.1:{port}", env=rbee_env, timeout=60)
        assert_coded(served, ExitCode.NETWORK, "CANNOT_LISTEN", f"`ss -ltnp 'sport = :{port}'`")
    elsewhere = run_rbee("hive", "--host", "192.0.2.1", env=rbee_env, timeout=60)  # TEST-NET-1
    assert_coded(elsewhere, ExitCode.NETWORK, "CANNOT_LISTEN", "this machine has no address")


def test_a_corrupt_catalog_says_where_it_is_and_how_to_rebuild(
    rbee_env: dict[str, str], model_path: Path
) -> None:
    catalog = Path(rbee_env["RBEE_DATA_DIR"]) / "catalog.db"
    catalog.parent.mkdir(parents=True)
    catalog.write_bytes(b"SQLite format 3\x00" + b"\x07" * 8000)
    listed = run_rbee("models", "list", env=rbee_env)
    assert_coded(listed, ExitCode.FAILURE, f"CATALOG_CORRUPT: the model catalog {catalog}")
    assert f"mv {catalog} {catalog}.broken" in listed.stderr
    inferred = run_rbee("infer", "-n", "2", "hi", env=rbee_env)  # through an ephemeral hive
    assert_coded(inferred, ExitCode.FAILURE, "CATALOG_CORRUPT")
    assert "HIVE_UNREACHABLE" not in inferred.stderr
    catalog.rename(catalog.with_name("catalog.db.broken"))  # what the hint says
    again = run_rbee("models", "import", str(model_path), "--name", "back", env=rbee_env)
    assert again.returncode == 0 and model_path.is_file(), again.stderr


def test_stdout_closed_early_or_full(rbee_env: dict[str, str]) -> None:
    long = ("infer", "-t", "0", "--ignore-eos", "-n", "400", "Tell me a story")
    keeper = subprocess.Popen(
        rbee_cmd(*long), env=rbee_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert keeper.stdout is not None and keeper.stderr is not None
    assert keeper.stdout.read(20)  # `| head -c 20`
    keeper.stdout.close()
    err = keeper.stderr.read().decode()
    assert keeper.wait(60) == ExitCode.FAILURE, err
    assert "OUTPUT_FAILED: stdout was closed" in err and "Traceback" not in err, err
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            rbee_cmd(*long), env=rbee_env, stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert_coded(done, ExitCode.FAILURE, "OUTPUT_FAILED: cannot write to stdout: No space left")


def test_metadata_cannot_drive_the_terminal_or_wreck_a_table(
    rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    """An architecture holding an OSC title sequence and colours is shown escaped by `models
    import` and `models list`; a 10,000-character value an older rbee let in is cut to fit."""
    hostile = "\x1b]0;pwned\x07\x1b[31mllama"
    kvs = [(k, t, hostile if k == "general.architecture" else v) for k, t, v in BASE_KVS]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(gguf_bytes(kvs, BASE_TENSORS))
    imported = run_rbee("models", "import", str(path), env=rbee_env)
    assert imported.returncode == 0, imported.stderr
    assert "\x1b" not in imported.stdout and "\\x1b]0;pwned\\x07" in imported.stdout
    catalog = Catalog(Path(rbee_env["RBEE_DATA_DIR"]) / "catalog.db")
    record = {**describe_file(model_path, "old-entry").__dict__, "architecture": "a" * 10_000}
    catalog.db.table("models").upsert(record, pk="name")
    catalog.close()
    listed = run_rbee("models", "list", env=rbee_env)
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "\\x1b[31mllama" in listed.stdout
    widest = max(len(line) for line in listed.stdout.splitlines())
    assert widest < 400 and "a" * (CELL_CHARS - 1) + "…" in listed.stdout, listed.stdout


def test_models_rm_of_a_loaded_model_needs_force_and_stops_its_worker(
    rbee_env: dict[str, str], model_path: Path
) -> None:
    run_rbee("models", "import", str(model_path), "--name", "held", env=rbee_env)
    with running_hive(rbee_env):
        ran = run_rbee("infer", "-m", "held", "-n", "2", "hi", env=rbee_env)
        assert ran.returncode == 0, ran.stderr
        refused = run_rbee("models", "rm", "held", env=rbee_env)
        assert_coded(refused, ExitCode.BUSY, "MODEL_IN_USE: held is loaded by worker w-", "--force")
        assert "held" in run_rbee("models", "list", env=rbee_env).stdout
        forced = run_rbee("models", "rm", "held", "--force", env=rbee_env)
        assert forced.returncode == 0 and "stopped worker w-" in forced.stdout, forced.stderr
        deadline = time.monotonic() + 15
        while "held" in run_rbee("ps", env=rbee_env).stdout:
            assert time.monotonic() < deadline, "the worker outlived its model's removal"
            time.sleep(0.5)
    assert "held" not in run_rbee("models", "list", env=rbee_env).stdout


def test_the_removed_default_model_stays_removed_until_imported_again(
    rbee_env: dict[str, str], model_path: Path
) -> None:
    assert DEFAULT_MODEL in run_rbee("models", "list", env=rbee_env).stdout
    removed = run_rbee("models", "rm", DEFAULT_MODEL, env=rbee_env)
    assert removed.returncode == 0 and "brings it back" in removed.stdout, removed.stderr
    assert DEFAULT_MODEL not in run_rbee("models", "list", env=rbee_env).stdout
    asked = run_rbee("infer", "-n", "2", "hi", env=rbee_env)
    assert_coded(asked, ExitCode.MODEL, "MODEL_NOT_FOUND: the bundled default model", "--name")
    back = run_rbee("models", "import", str(model_path), "--name", DEFAULT_MODEL, env=rbee_env)
    assert back.returncode == 0, back.stderr
    assert DEFAULT_MODEL in run_rbee("models", "list", env=rbee_env).stdout


def test_concurrent_imports_under_one_name_let_exactly_one_win(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    files = []
    for i in range(6):
        kvs = [(k, t, f"model {i}" if k == "general.name" else v) for k, t, v in BASE_KVS]
        files.append(tmp_path / f"m{i}.gguf")
        files[-1].write_bytes(gguf_bytes(kvs, BASE_TENSORS) + bytes(i))  # six different files
    procs = [
        subprocess.Popen(
            rbee_cmd("models", "import", str(f), "--name", "contested"),
            env=rbee_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    winners = [out for code, out, _ in results if code == 0]
    assert len(winners) == 1, results
    assert all("already names" in err for code, _, err in results if code != 0), results
    listed = run_rbee("models", "list", env=rbee_env).stdout
    assert listed.count("contested") == 1


def test_small_things_a_new_user_met(rbee_env: dict[str, str], tmp_path: Path) -> None:
    with running_hive(rbee_env):
        logs = run_rbee("logs", "w-nope", env=rbee_env)
        assert_coded(logs, ExitCode.FAILURE, "WORKER_NOT_FOUND: no worker w-nope")
    seeds = run_rbee("nodes", env={**rbee_env, "RBEE_SEEDS": "10.1.2.3:99999"})
    assert_coded(seeds, ExitCode.USAGE, "RBEE_SEEDS='10.1.2.3:99999'", "ports 1-65535")
    assert "--node" not in seeds.stderr
    missing = run_rbee("nodes", env={**rbee_env, "RBEE_CONFIG": str(tmp_path / "nope.toml")})
    assert_coded(missing, ExitCode.USAGE, f"RBEE_CONFIG names {tmp_path / 'nope.toml'}")
    for args in (("infer", "--node", "", "hi"), ("models", "import", "x.gguf", "--name", "")):
        empty = run_rbee(*args, env=rbee_env)
        assert_coded(empty, ExitCode.USAGE, "is empty")
    target = tmp_path / "target-name.gguf"
    target.write_bytes(gguf_bytes(BASE_KVS, BASE_TENSORS))
    (tmp_path / "link-name.gguf").symlink_to(target)
    linked = run_rbee("models", "import", str(tmp_path / "link-name.gguf"), env=rbee_env)
    assert linked.returncode == 0 and "imported link-name:" in linked.stdout, linked.stderr
    long = run_rbee("models", "import", str(target), "--name", "n" * 5000, env=rbee_env)
    assert_coded(long, ExitCode.USAGE, "is 5000 characters long")
    assert len(long.stderr) < 500
    started = time.monotonic()
    garbage = run_rbee("pair", "127.0.0.1", "garbage", env=rbee_env)
    assert_coded(garbage, ExitCode.USAGE, "'garbage' is not a pairing code")
    assert time.monotonic() - started < 3
    helps = {cmd: run_rbee(*cmd, "--help", env=rbee_env).stdout for cmd in HELPED}
    assert "hf:ORG/REPO" in helps[("infer",)] and "node name" in helps[("infer",)]
    assert "an imported file is kept" in helps[("models",)]
    assert "[ACTION]" in helps[("hive",)]
    shown = run_rbee("config", "show", env={**rbee_env, "XDG_CONFIG_HOME": str(tmp_path)})
    assert "(no such file" in shown.stdout or "/etc/rbee" in shown.stdout, shown.stdout


HELPED = [("infer",), ("models",), ("hive",)]


def test_a_queued_job_says_its_place_once_per_change(rbee_env: dict[str, str]) -> None:
    """Off a terminal the hive's once-a-second queue reports are said only when they change."""
    with running_hive(rbee_env, "--parallel", "1"):  # one slot: the second job queues
        first = subprocess.Popen(
            rbee_cmd("infer", "-t", "0", "--ignore-eos", "-n", "300", "Tell a story"),
            env=rbee_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert first.stderr is not None
        try:
            while "[inference]" not in first.stderr.readline():
                assert first.poll() is None, "the first job never started"
            queued = run_rbee("infer", "-n", "2", "hi", env=rbee_env)
            first.communicate(timeout=60)
        finally:  # a failure's traceback keeps ``first``: end it and close its pipe now
            if first.poll() is None:
                first.kill()
                first.wait()
            first.stderr.close()
    assert queued.returncode == 0, queued.stderr
    lines = [line for line in queued.stderr.splitlines() if line.startswith("[queue]")]
    assert len(lines) == 1 and "position 1 of 1" in lines[0], queued.stderr
