"""What a repo revision holds on the Hub, asked through huggingface_hub; Hub errors → rbee's.

huggingface_hub reads ``HF_ENDPOINT`` once, at import, into its constants; rbee reads it on each
call (:func:`hub_endpoint`) and passes it explicitly, so a hive started with a different
environment, and every test with its own local server, talks to the endpoint it was given.

The metadata call pins a revision (a branch or tag) to its commit: every URL rbee builds for the
transfer names that commit, so the bytes cannot change under a resumed download. The Hub reports
each LFS file's size and sha256 (every GGUF is stored with LFS); for a small file kept in git it
reports the git blob id, which :mod:`rbee.hub.transfer` verifies instead.

Errors map as follows (everything else huggingface_hub raises stays a bug, i.e. propagates)::

    RepositoryNotFoundError, RevisionNotFoundError,
    EntryNotFoundError, HTTP 404                      → ModelNotFound
    GatedRepoError, HTTP 401 / 403                    → AccessDenied (set HF_TOKEN / accept terms)
    HTTP 429 / 5xx, network errors, timeouts          → DownloadFailed (retryable)
    HF_HUB_OFFLINE set                                → DownloadFailed (not retryable)
    any other HTTP error, a malformed answer          → DownloadFailed (not retryable)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import httpx2
from huggingface_hub import HfApi, get_token, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoSibling

from rbee import __version__
from rbee.errors import AccessDenied, Canceled, DownloadFailed, ModelNotFound, RbeeError
from rbee.hub.files import COMMIT, TOKEN_SUGGESTION, RemoteFile, http_status_error
from rbee.hub.refs import DEFAULT_REVISION, reference_problems

DEFAULT_ENDPOINT = "https://huggingface.co"
API_TIMEOUT_S = 30.0  # one metadata request, connect and read
API_ATTEMPTS = 3  # metadata requests tried before a retryable failure is reported
API_BACKOFF_S = 1.0  # wait before the second attempt; doubles after each


def hub_endpoint() -> str:
    """The Hub's base URL: ``HF_ENDPOINT`` as set now, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    """The Hub token huggingface_hub would use now (``HF_TOKEN``, then its token file)."""
    return get_token()


@dataclass(frozen=True)
class RepoSnapshot:
    """A repo at one commit: its canonical id, every file path, and the files rbee can fetch.

    ``unusable`` says, for each listed file that is not in ``files``, why not (an odd name, no
    size or hash), so picking one gives a clear error rather than a wrong download.
    """

    repo: str
    commit: str
    names: tuple[str, ...]
    files: Mapping[str, RemoteFile] = field(hash=False)
    unusable: Mapping[str, str] = field(hash=False, default_factory=dict)

    def file(self, name: str) -> RemoteFile:
        """The metadata of one file; DownloadFailed if the Hub's description of it is unusable."""
        found = self.files.get(name)
        if found is None:
            why = self.unusable.get(name, "it is not in the repo")
            raise DownloadFailed(f"cannot fetch {self.repo}/{name}: {why}", retryable=False)
        return found


class HubClient:
    """Asks one Hub endpoint about repos; thread-safe (it holds no connection of its own)."""

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        self.endpoint = (endpoint or hub_endpoint()).rstrip("/")
        self.token = token if token is not None else hub_token()
        self._api = HfApi(
            endpoint=self.endpoint,
            token=self.token or False,  # False: don't look for a token file a second time
            library_name="rbee",
            library_version=__version__,
        )

    def snapshot(
        self, repo: str, revision: str = DEFAULT_REVISION, cancel: threading.Event | None = None
    ) -> RepoSnapshot:
        """The files of ``repo`` at ``revision``, pinned to its commit (retried, bounded)."""
        delay = API_BACKOFF_S
        attempt = 0
        while True:
            attempt += 1
            try:
                info = self._api.model_info(
                    repo, revision=revision, files_metadata=True, timeout=API_TIMEOUT_S
                )
                break
            except Exception as exc:  # narrowed by translate_hub_error, which re-raises bugs
                error = translate_hub_error(exc, repo, revision)
                if not error.retryable or attempt >= API_ATTEMPTS:
                    raise error from exc
            if cancel is not None and cancel.wait(delay):
                raise Canceled(f"asking the Hub about {repo} was canceled")
            delay *= 2
        return self._snapshot(repo, info.id, info.sha, info.siblings or [])

    def file_url(self, repo: str, commit: str, filename: str) -> str:
        """The resolve URL of one file at one commit on this endpoint."""
        return hf_hub_url(repo, filename, revision=commit, endpoint=self.endpoint)

    def _snapshot(
        self, asked: str, repo_id: object, sha: object, siblings: list[RepoSibling]
    ) -> RepoSnapshot:
        repo = repo_id if isinstance(repo_id, str) else asked
        if reference_problems(repo, None, None, None):
            repo = asked  # the Hub named the repo oddly; keep the name we validated
        if not isinstance(sha, str) or not COMMIT.fullmatch(sha):
            raise DownloadFailed(f"the Hub gave no commit for {asked} (sha: {sha!r})")
        files: dict[str, RemoteFile] = {}
        unusable: dict[str, str] = {}
        for sibling in siblings:
            name, lfs = sibling.rfilename, sibling.lfs
            size = lfs.size if lfs is not None else sibling.size
            if not isinstance(size, int):
                unusable[name] = "the Hub gave no size for it"
                continue
            try:
                files[name] = RemoteFile(
                    repo=repo,
                    filename=name,
                    commit=sha,
                    size=size,
                    sha256=lfs.sha256 if lfs is not None else None,
                    url=self.file_url(repo, sha, name),
                    blob_id=None if lfs is not None else sibling.blob_id,
                )
            except DownloadFailed as exc:
                unusable[name] = exc.message
        names = tuple(sibling.rfilename for sibling in siblings)
        return RepoSnapshot(repo, sha, names, MappingProxyType(files), MappingProxyType(unusable))


def translate_hub_error(
    exc: BaseException, repo: str, revision: str = DEFAULT_REVISION
) -> RbeeError:
    """The rbee error for an exception huggingface_hub raised about ``repo``; bugs re-raise."""
    if isinstance(exc, RbeeError):
        return exc
    if isinstance(exc, GatedRepoError):
        return AccessDenied(f"{repo} is gated on the Hub", suggestion=TOKEN_SUGGESTION)
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(
            f"no revision {revision!r} in {repo} on the Hub",
            suggestion="name a branch, tag or commit that exists, or leave out @REVISION",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFound(
            f"no repo {repo} on the Hub (or it is private)",
            suggestion="check the ORG/REPO spelling; for a private repo " + TOKEN_SUGGESTION,
        )
    if isinstance(exc, EntryNotFoundError):
        return ModelNotFound(f"{repo}@{revision} lacks a file rbee asked for: {exc}")
    if isinstance(exc, HfHubHTTPError):
        return http_status_error(exc.response.status_code, repo, str(exc).splitlines()[0])
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadFailed(
            f"cannot reach the Hub for {repo}: HF_HUB_OFFLINE is set",
            suggestion="unset HF_HUB_OFFLINE, or import the file with `rbee models import`",
            retryable=False,
        )
    if isinstance(exc, httpx2.TransportError):
        return DownloadFailed(f"cannot reach the Hub for {repo}: {exc!r}", retryable=True)
    if isinstance(exc, ValueError):  # a malformed answer (bad JSON, missing fields)
        return DownloadFailed(f"the Hub's answer about {repo} is malformed: {exc}", retryable=False)
    raise exc
