"""Unit tests for rbee.errors: codes, exit codes, the wire round trip, and the docstring table."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import rbee.errors as errors_module
from rbee.errors import (
    ERRORS_BY_CODE,
    AllSlotsBusy,
    Canceled,
    ExitCode,
    HiveLost,
    HiveUnreachable,
    InternalError,
    InvalidRequest,
    RbeeError,
    Timeout,
    error_from_code,
)

SUBCLASSES: list[type[RbeeError]] = sorted(
    (
        cls
        for _, cls in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(cls, RbeeError)
        and cls is not RbeeError
        and cls.__module__ == errors_module.__name__
    ),
    key=lambda c: c.__name__,
)
TABLE_ROW = re.compile(r"^\s*[├└]── (\w+)\s+([A-Z_]+)\s+(\d+)\s*$")


def _docstring_table() -> dict[str, tuple[str, int]]:
    doc = errors_module.__doc__ or ""
    rows: dict[str, tuple[str, int]] = {}
    for line in doc.splitlines():
        m = TABLE_ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            rows[m.group(1)] = (m.group(2), int(m.group(3)))
    return rows


def test_subclasses_are_found() -> None:
    names = {cls.__name__ for cls in SUBCLASSES}
    assert {"InvalidRequest", "ProtocolError", "HiveLost", "Canceled", "InternalError"} <= names
    assert "RbeeError" not in names


def test_codes_are_unique_upper_snake() -> None:
    codes = [cls.code for cls in SUBCLASSES]
    assert len(set(codes)) == len(codes), codes
    for code in codes:
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", code), code


def test_every_subclass_overrides_its_code() -> None:
    # Only InternalError may share the root's code; any other subclass that forgot to set
    # ``code`` would silently be reported as INTERNAL.
    for cls in SUBCLASSES:
        if cls is not InternalError:
            assert "code" in cls.__dict__, cls.__name__


def test_errors_by_code_covers_every_subclass() -> None:
    assert set(ERRORS_BY_CODE.values()) == set(SUBCLASSES)
    for code, cls in ERRORS_BY_CODE.items():
        assert cls.code == code


def test_a_class_setting_a_taken_code_is_refused() -> None:
    with pytest.raises(TypeError, match="reuses Timeout's code"):

        class Late(RbeeError):
            code = "TIMEOUT"

    assert ERRORS_BY_CODE["TIMEOUT"] is Timeout


def test_exit_codes_are_known_exit_codes() -> None:
    known = {v for k, v in vars(ExitCode).items() if k.isupper()}
    classes: list[type[RbeeError]] = [RbeeError, *SUBCLASSES]
    for cls in classes:
        assert cls.exit_code in known, cls.__name__
        assert cls.exit_code != ExitCode.OK


def test_docstring_table_matches_the_classes() -> None:
    table = _docstring_table()
    assert set(table) == {cls.__name__ for cls in SUBCLASSES}
    for cls in SUBCLASSES:
        code, exit_code = table[cls.__name__]
        assert (code, exit_code) == (cls.code, cls.exit_code), cls.__name__


def test_docstring_table_is_parsed_for_real() -> None:
    table = _docstring_table()
    assert table["InvalidRequest"] == ("INVALID_REQUEST", 2)
    assert table["WorkerStartFailed"] == ("WORKER_START_FAILED", 5)
    assert table["Canceled"] == ("CANCELED", 130)


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_error_from_code_round_trips(cls: type[RbeeError]) -> None:
    for retryable in (True, False):
        original = cls("it broke: ünïcode", suggestion="try this", retryable=retryable)
        rebuilt = error_from_code(
            original.code,
            original.message,
            suggestion=original.suggestion,
            retryable=original.retryable,
        )
        assert type(rebuilt) is cls
        assert rebuilt.code == original.code
        assert rebuilt.message == original.message
        assert rebuilt.suggestion == "try this"
        assert rebuilt.retryable is retryable
        assert str(rebuilt) == f"{cls.code}: it broke: ünïcode"


def test_unknown_code_stays_visible() -> None:
    err = error_from_code("FLUX_CAPACITOR", "out of plutonium", suggestion="s", retryable=True)
    assert type(err) is InternalError
    assert err.code == "INTERNAL"
    assert "FLUX_CAPACITOR" in err.message
    assert "out of plutonium" in err.message
    assert err.suggestion == "s"
    assert err.retryable is True


def test_default_retryable_and_override() -> None:
    retryable = {cls for cls in SUBCLASSES if cls("m").retryable}
    assert {HiveUnreachable, HiveLost, AllSlotsBusy, Timeout} <= retryable
    assert not {InvalidRequest, InternalError, Canceled} & retryable
    for cls in SUBCLASSES:
        assert cls("m").retryable is cls.default_retryable
    assert HiveLost("m", retryable=False).retryable is False
    assert InvalidRequest("m", retryable=True).retryable is True


def test_error_attributes_and_str() -> None:
    err = Canceled("stopped by you")
    assert isinstance(err, RbeeError)
    assert isinstance(err, Exception)
    assert err.message == "stopped by you"
    assert err.suggestion == ""
    assert err.args == ("stopped by you",)
    assert str(err) == "CANCELED: stopped by you"
    assert err.exit_code == 130


@pytest.mark.parametrize("cls", [HiveLost, AllSlotsBusy, Timeout, HiveUnreachable])
def test_error_from_code_without_flag_keeps_class_default(cls: type[RbeeError]) -> None:
    assert error_from_code(cls.code, "m").retryable is True


def test_readme_lists_every_code_under_its_exit_status() -> None:
    """README's table is what users read: every code must be there, on its exit status's row."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    listed: dict[str, int] = {}
    for m in re.finditer(r"^\| (\d+) \| (.*) \|$", readme, re.MULTILINE):
        for code in re.findall(r"`([A-Z][A-Z0-9_]+)`", m.group(2)):
            listed[code] = int(m.group(1))
    assert listed == {cls.code: cls.exit_code for cls in SUBCLASSES}
