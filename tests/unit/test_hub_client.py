"""Tests for rbee.hub.client's pure parts: RemoteFile validation and Hub error mapping."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from rbee.errors import AccessDenied, DownloadFailed, ModelNotFound
from rbee.hub.client import hub_endpoint, translate_hub_error
from rbee.hub.files import RemoteFile


def remote(**kw: object) -> RemoteFile:
    fields: dict[str, object] = {
        "repo": "acme/m-GGUF",
        "filename": "sub/m-Q8_0.gguf",
        "commit": "c" * 40,
        "size": 100,
        "sha256": "5" * 64,
        "url": "http://hub/x",
    }
    fields.update(kw)
    return RemoteFile(**fields)  # type: ignore[arg-type]


def test_remote_file_key() -> None:
    assert remote().key == ("acme/m-GGUF", "c" * 40, "sub/m-Q8_0.gguf")


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"filename": "../x.gguf"}, "'..'"),
        ({"filename": "/etc/x.gguf"}, "relative"),
        ({"repo": "acme/../x"}, "'..'"),
        ({"repo": "acme"}, "ORG/REPO"),
        ({"commit": "main"}, "40-digit"),
        ({"sha256": "xyz"}, "64 hex"),
        ({"size": -1}, "negative"),
        ({"sha256": None}, "neither a sha256 nor a blob id"),
    ],
)
def test_remote_file_validates(fields: dict[str, object], complaint: str) -> None:
    with pytest.raises(DownloadFailed, match=complaint):
        remote(**fields)


def test_remote_file_without_lfs_uses_the_blob_id() -> None:
    assert remote(sha256=None, blob_id="b" * 40).blob_id == "b" * 40


def test_hub_endpoint_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert hub_endpoint() == "http://127.0.0.1:9"
    monkeypatch.delenv("HF_ENDPOINT")
    assert hub_endpoint() == "https://huggingface.co"


def _http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", "http://hub/api/models/acme/m")
    return cls("boom", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("exc", "expected", "retryable"),
    [
        (_http_error(GatedRepoError, 403), AccessDenied, False),
        (_http_error(RepositoryNotFoundError, 404), ModelNotFound, False),
        (_http_error(RevisionNotFoundError, 404), ModelNotFound, False),
        (_http_error(RemoteEntryNotFoundError, 404), ModelNotFound, False),
        (_http_error(HfHubHTTPError, 404), ModelNotFound, False),
        (_http_error(HfHubHTTPError, 401), AccessDenied, False),
        (_http_error(HfHubHTTPError, 403), AccessDenied, False),
        (_http_error(HfHubHTTPError, 429), DownloadFailed, True),
        (_http_error(HfHubHTTPError, 503), DownloadFailed, True),
        (_http_error(HfHubHTTPError, 400), DownloadFailed, False),
        (httpx2.ConnectError("refused"), DownloadFailed, True),
        (httpx2.ReadTimeout("slow"), DownloadFailed, True),
        (OfflineModeIsEnabled("offline"), DownloadFailed, False),
        (ValueError("bad json"), DownloadFailed, False),
    ],
)
def test_translate_hub_error(exc: Exception, expected: type[Exception], retryable: bool) -> None:
    error = translate_hub_error(exc, "acme/m", "main")
    assert type(error) is expected
    assert error.retryable is retryable
    if expected is AccessDenied:
        assert "HF_TOKEN" in error.suggestion


def test_translate_hub_error_reraises_bugs() -> None:
    with pytest.raises(KeyError):
        translate_hub_error(KeyError("bug"), "acme/m")
