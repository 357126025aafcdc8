"""A Hub file as rbee fetches it, and the errors HTTP statuses mean: what the transfer and
the local layout need, without huggingface_hub (which only the metadata client imports, so a
hive that never downloads never loads it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rbee.errors import AccessDenied, DownloadFailed, ModelNotFound, RbeeError
from rbee.hub.refs import reference_problems

TOKEN_SUGGESTION = (
    "set HF_TOKEN to a Hugging Face token that may read the repo, and accept the model's "
    "license on its Hub page if it is gated"
)

COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo, pinned to a commit: where to fetch it and how to check it.

    ``sha256`` is the Hub's LFS hash; for a file kept in git it is None and ``blob_id`` (the git
    blob sha1) is what the transfer verifies. Building one validates every field, so its names
    are safe to use in URLs and local paths.
    """

    repo: str
    filename: str
    commit: str
    size: int
    sha256: str | None
    url: str
    blob_id: str | None = None

    def __post_init__(self) -> None:
        problems = reference_problems(self.repo, None, None, None)
        problems += reference_problems("a/b", None, self.filename, None)
        if not COMMIT.fullmatch(self.commit):
            problems.append(f"commit {self.commit!r} is not a 40-digit hex sha")
        if self.size < 0:
            problems.append(f"negative size {self.size}")
        if self.sha256 is not None and not SHA256.fullmatch(self.sha256):
            problems.append(f"sha256 {self.sha256!r} is not 64 hex digits")
        if self.blob_id is not None and not COMMIT.fullmatch(self.blob_id):
            problems.append(f"blob id {self.blob_id!r} is not 40 hex digits")
        if self.sha256 is None and self.blob_id is None:
            problems.append("the Hub gave neither a sha256 nor a blob id to verify it with")
        if problems:
            raise DownloadFailed(
                f"the Hub described {self.repo}/{self.filename} unusably: {'; '.join(problems)}",
                retryable=False,
            )

    @property
    def key(self) -> tuple[str, str, str]:
        """What makes two requests the same transfer: repo, commit and file."""
        return (self.repo, self.commit, self.filename)


def http_status_error(status: int, what: str, detail: str = "") -> RbeeError:
    """The rbee error for an HTTP error status from the Hub or its file storage."""
    text = f"the Hub answered HTTP {status} for {what}" + (f" ({detail})" if detail else "")
    if status == 404:
        return ModelNotFound(text)
    if status in (401, 403):
        return AccessDenied(text, suggestion=TOKEN_SUGGESTION)
    return DownloadFailed(text, retryable=status == 429 or status >= 500)
