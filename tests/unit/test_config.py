"""Configuration precedence (file < environment < flags) and every kind of config error."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee import config
from rbee.errors import InvalidRequest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No RBEE_* settings; config.apply() writes into os.environ, so all of it is restored."""
    saved = dict(os.environ)
    for s in config.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    path = tmp_path / "config.toml"
    path.write_text("")
    monkeypatch.setenv("RBEE_CONFIG", str(path))
    yield path
    os.environ.clear()
    os.environ.update(saved)


def test_file_then_environment_then_flags(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env.write_text('[hive]\nport = 9100\nmax_queue = 3\n[lan]\nseeds = ["a:1", "b"]\n')
    monkeypatch.setenv("RBEE_MAX_QUEUE", "5")
    sources = config.apply()
    assert os.environ["RBEE_HIVE_PORT"] == "9100" and sources["RBEE_HIVE_PORT"] == str(clean_env)
    assert os.environ["RBEE_MAX_QUEUE"] == "5" and sources["RBEE_MAX_QUEUE"] == "environment"
    assert os.environ["RBEE_SEEDS"] == "a:1,b"
    shown = config.show(sources, {"max_queue": 7})
    assert f"hive.port = 9100    ({clean_env}; RBEE_HIVE_PORT)" in shown
    assert "hive.max_queue = 7    (flag; RBEE_MAX_QUEUE)" in shown
    assert "log.level = info    (default; RBEE_LOG_LEVEL)" in shown


def test_no_file_is_fine(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEE_CONFIG")
    clean_env.unlink()
    assert config.apply(clean_env) == {}  # the default file, absent


def test_a_config_file_named_explicitly_must_exist(clean_env: Path) -> None:
    clean_env.unlink()
    with pytest.raises(InvalidRequest, match=f"RBEE_CONFIG names {clean_env}, which does not"):
        config.apply()
    clean_env.write_text("")
    assert config.apply() == {}


@pytest.mark.parametrize("seeds", ["h:70000", "h:0", "a:1,b:x", "[::1", "[::1]:99999"])
def test_a_bad_seed_is_named_as_rbee_seeds(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, seeds: str
) -> None:
    monkeypatch.setenv("RBEE_SEEDS", seeds)
    with pytest.raises(InvalidRequest, match=r"RBEE_SEEDS=.*HOST\[:PORT\] items with ports"):
        config.apply()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[hive]\nprot = 1\n", "hive.prot: unknown setting"),
        ("[hive]\nport = 70000\n", "hive.port: expected a port number, 1-65535 (got 70000)"),
        ('[hive]\nport = "7830"\n', "hive.port: expected a port number"),
        ("[hive]\nsecure = 1\n", "hive.secure: expected true or false"),
        ('[log]\nlevel = "loud"\n', "log.level: expected one of"),
        ("[lan]\nseeds = [1]\n", "lan.seeds: expected a list of strings"),
        ('hive = "x"\n', "hive: expected a [hive] table"),
        ("[hive\n", "not valid TOML"),
    ],
)
def test_each_error_names_file_key_and_expectation(
    clean_env: Path, text: str, expected: str
) -> None:
    clean_env.write_text(text)
    with pytest.raises(InvalidRequest) as err:
        config.apply()
    assert str(clean_env) in err.value.message and expected in err.value.message


@pytest.mark.parametrize(
    ("name", "text", "stored"),
    [
        ("RBEE_SECURE", "0", ""),
        ("RBEE_SECURE", "off", ""),
        ("RBEE_SECURE", "Yes", "1"),
        ("RBEE_LOG_LEVEL", "DEBUG", "debug"),
        ("RBEE_SEEDS", " a:1 , b ", "a:1,b"),
        ("RBEE_HIVE_PORT", " 9100", "9100"),
    ],
)
def test_environment_values_are_checked_and_normalised(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str, stored: str
) -> None:
    monkeypatch.setenv(name, text)
    config.apply()
    assert os.environ[name] == stored


def test_each_bad_environment_value_is_named(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_HIVE_PORT", "0")
    monkeypatch.setenv("RBEE_MAX_WORKERS", "four")
    monkeypatch.setenv("RBEE_SECURE", "maybe")
    monkeypatch.setenv("RBEE_LOG_LEVEL", "loud")
    with pytest.raises(InvalidRequest) as err:
        config.apply()
    message = err.value.message
    assert "RBEE_HIVE_PORT='0': expected a port number, 1-65535" in message
    assert "RBEE_MAX_WORKERS='four': expected a whole number" in message
    assert "RBEE_SECURE='maybe': expected true or false" in message
    assert "RBEE_LOG_LEVEL='loud': expected one of" in message


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--port", "70000"), "--port: expected a port number, 1-65535"),
        (("--port", "-1"), "--port: expected a port number, 1-65535"),
        (("--stream-port", "x"), "--stream-port: expected a port number"),
        (("--max-workers", "0"), "--max-workers: expected a whole number ≥ 1"),
        (("--max-workers", "-3"), "--max-workers: expected a whole number ≥ 1"),
        (("--max-queue", "0"), "--max-queue: expected a whole number ≥ 1"),
        (("--max-workers-per-model", "0"), "--max-workers-per-model: expected a whole number ≥ 1"),
        (("--threads", "-2"), "--threads: expected a whole number ≥ 0"),
        (("--parallel", "-1"), "--parallel: expected a whole number 0-256 (0: automatic)"),
        (("--parallel", "257"), "--parallel: expected a whole number 0-256"),
        (("--parallel", "four"), "--parallel: expected a whole number 0-256"),
        (("--stream-interval-ms", "-1"), "--stream-interval-ms: expected a whole number of ms"),
        (("--stream-interval-ms", "1001"), "--stream-interval-ms: expected a whole number of ms"),
    ],
)
def test_hive_flags_are_checked_like_the_file(
    flags: tuple[str, ...], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rbee import cli

    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["hive", *flags])
    assert exited.value.code == 2 and expected in capsys.readouterr().err


def test_a_zero_worker_limit_is_refused_in_the_file_and_environment_too(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_MAX_WORKERS", "0")
    with pytest.raises(InvalidRequest, match="RBEE_MAX_WORKERS='0': expected a whole number ≥ 1"):
        config.check_environment()


def test_parallel_from_the_file_the_environment_and_the_flag(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rbee import cli

    assert cli.build_parser().parse_args(["hive"]).parallel == 0  # automatic by default
    clean_env.write_text("[hive]\nparallel = 8\n")
    config.apply()
    assert os.environ["RBEE_PARALLEL"] == "8"
    assert cli.build_parser().parse_args(["hive"]).parallel == 8
    assert cli.build_parser().parse_args(["hive", "--parallel", "2"]).parallel == 2
    clean_env.write_text("[hive]\nparallel = 300\n")
    with pytest.raises(InvalidRequest, match=r"hive.parallel: expected a whole number 0-256"):
        config.apply()
    monkeypatch.setenv("RBEE_PARALLEL", "-3")
    with pytest.raises(InvalidRequest, match="RBEE_PARALLEL='-3': expected a whole number 0-256"):
        config.check_environment()


def test_stream_interval_from_the_file_the_environment_and_the_flag(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rbee import cli

    assert cli.build_parser().parse_args(["hive"]).stream_interval_ms == 25
    clean_env.write_text("[hive]\nstream_interval_ms = 0\n")
    config.apply()
    assert cli.build_parser().parse_args(["hive"]).stream_interval_ms == 0
    flags = ["hive", "--stream-interval-ms", "40"]
    assert cli.build_parser().parse_args(flags).stream_interval_ms == 40
    clean_env.write_text("[hive]\nstream_interval_ms = 5000\n")
    with pytest.raises(InvalidRequest, match=r"hive.stream_interval_ms: expected a whole"):
        config.apply()
    monkeypatch.setenv("RBEE_STREAM_INTERVAL_MS", "x")
    with pytest.raises(InvalidRequest, match="RBEE_STREAM_INTERVAL_MS='x': expected"):
        config.check_environment()


def test_a_hive_pins_the_backend_from_the_file_the_environment_and_the_flag(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rbee import cli

    assert cli.build_parser().parse_args(["hive"]).backend == "auto"  # placed as it fits
    clean_env.write_text('[hive]\nbackend = "cpu"\n')
    config.apply()
    assert os.environ["RBEE_BACKEND"] == "cpu"
    assert cli.build_parser().parse_args(["hive"]).backend == "cpu"
    assert cli.build_parser().parse_args(["hive", "--backend", "cuda"]).backend == "cuda"
    clean_env.write_text('[hive]\nbackend = "metal"\n')
    with pytest.raises(InvalidRequest, match=r'hive.backend: expected "auto" or "cpu" or "cuda"'):
        config.apply()
