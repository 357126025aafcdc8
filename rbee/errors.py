"""One error tree for all of rbee.

Inside a process an error is an exception; across a socket it is data (an ``Error`` frame with a
stable code, a message, a suggestion and a retryable flag); across a process exit it is a named
exit code. This module is the one place that ties the three together::

    RbeeError                      code            exit
    ├── InvalidRequest             INVALID_REQUEST    2
    ├── ProtocolError              PROTOCOL_ERROR     1
    ├── VersionMismatch            VERSION_MISMATCH   1
    ├── ModelNotFound              MODEL_NOT_FOUND    3
    ├── InvalidModel               INVALID_MODEL      3
    ├── HiveUnreachable            HIVE_UNREACHABLE   4
    ├── HiveLost                   HIVE_LOST          4
    ├── WorkerStartFailed          WORKER_START_FAILED 5
    ├── WorkerCrashed              WORKER_CRASHED     1
    ├── LenderLost                 LENDER_LOST        4
    ├── LendingRefused             LENDING_REFUSED    7
    ├── WorkerNotFound             WORKER_NOT_FOUND   1
    ├── JobNotFound                JOB_NOT_FOUND      1
    ├── AllSlotsBusy               ALL_SLOTS_BUSY     6
    ├── HiveDraining               HIVE_DRAINING      6
    ├── ModelInUse                 MODEL_IN_USE       6
    ├── LoadingTimeout             LOADING_TIMEOUT    5
    ├── InsufficientRam            INSUFFICIENT_RAM   7
    ├── InsufficientVram           INSUFFICIENT_VRAM  7
    ├── InsufficientDisk           INSUFFICIENT_DISK  7
    ├── BackendUnavailable         BACKEND_UNAVAILABLE 7
    ├── ModelAmbiguous             MODEL_AMBIGUOUS    3
    ├── ChecksumMismatch           CHECKSUM_MISMATCH  8
    ├── DownloadFailed             DOWNLOAD_FAILED    8
    ├── AccessDenied               ACCESS_DENIED      9
    ├── HiveKeyChanged             HIVE_KEY_CHANGED   9
    ├── Timeout                    TIMEOUT            1
    ├── CannotListen               CANNOT_LISTEN      4
    ├── CatalogCorrupt             CATALOG_CORRUPT    1
    ├── OutputFailed               OUTPUT_FAILED      1
    ├── JobStopped                 JOB_STOPPED       10
    ├── Canceled                   CANCELED         130
    └── InternalError              INTERNAL           1
"""

from __future__ import annotations

from typing import ClassVar


class ExitCode:
    """Process exit codes of the ``rbee`` command (documented in README.md)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    MODEL = 3
    NETWORK = 4
    WORKER = 5
    BUSY = 6
    RESOURCES = 7
    DOWNLOAD = 8
    ACCESS = 9
    STOPPED = 10
    CANCELED = 130


ERRORS_BY_CODE: dict[str, type[RbeeError]] = {}  # each subclass that sets a code adds itself


class RbeeError(Exception):
    """Root of every error rbee raises on purpose."""

    code: ClassVar[str] = "INTERNAL"
    exit_code: ClassVar[int] = ExitCode.FAILURE
    default_retryable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            if cls.code in ERRORS_BY_CODE:
                raise TypeError(f"{cls.__name__} reuses {ERRORS_BY_CODE[cls.code].__name__}'s code")
            ERRORS_BY_CODE[cls.code] = cls

    def __init__(
        self,
        message: str,
        *,
        suggestion: str = "",
        retryable: bool | None = None,
        retry_after_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.suggestion = suggestion
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(RbeeError):
    """A request or its parameters failed validation; the message names every bad field."""

    code = "INVALID_REQUEST"
    exit_code = ExitCode.USAGE


class ProtocolError(RbeeError):
    """A frame could not be decoded or did not match the schema."""

    code = "PROTOCOL_ERROR"


class VersionMismatch(RbeeError):
    """The peer speaks a protocol version this build cannot talk to."""

    code = "VERSION_MISMATCH"


class ModelNotFound(RbeeError):
    """The model reference names nothing in the catalog and no file."""

    code = "MODEL_NOT_FOUND"
    exit_code = ExitCode.MODEL


class InvalidModel(RbeeError):
    """The model file is missing, unreadable or not a GGUF file."""

    code = "INVALID_MODEL"
    exit_code = ExitCode.MODEL


class HiveUnreachable(RbeeError):
    """No hive answered at the address within the retries' deadline."""

    code = "HIVE_UNREACHABLE"
    exit_code = ExitCode.NETWORK
    default_retryable = True


class HiveLost(RbeeError):
    """A hive stopped answering in the middle of a request or stream."""

    code = "HIVE_LOST"
    exit_code = ExitCode.NETWORK
    default_retryable = True


class WorkerStartFailed(RbeeError):
    """A worker process exited or timed out before it reported Ready."""

    code = "WORKER_START_FAILED"
    exit_code = ExitCode.WORKER


class WorkerCrashed(RbeeError):
    """A worker process died (or hung) while it ran a job."""

    code = "WORKER_CRASHED"


class LenderLost(RbeeError):
    """A hive lending memory to a model's layers died, was cut off or stalled."""

    code = "LENDER_LOST"
    exit_code = ExitCode.NETWORK
    default_retryable = True


class LendingRefused(RbeeError):
    """A hive will not lend its memory (lending is off there, or it has no room)."""

    code = "LENDING_REFUSED"
    exit_code = ExitCode.RESOURCES


class WorkerNotFound(RbeeError):
    """A request named a worker id the hive does not know."""

    code = "WORKER_NOT_FOUND"


class JobNotFound(RbeeError):
    """A request named a job id the hive does not know (or no longer remembers)."""

    code = "JOB_NOT_FOUND"


class AllSlotsBusy(RbeeError):
    """Every worker able to serve the request is busy."""

    code = "ALL_SLOTS_BUSY"
    exit_code = ExitCode.BUSY
    default_retryable = True


class HiveDraining(RbeeError):
    """The hive is shutting down and takes no new work."""

    code = "HIVE_DRAINING"
    exit_code = ExitCode.BUSY
    default_retryable = True


class ModelInUse(RbeeError):
    """A model to be removed is loaded by a worker; ``--force`` stops the worker first."""

    code = "MODEL_IN_USE"
    exit_code = ExitCode.BUSY


class LoadingTimeout(RbeeError):
    """A worker made no loading progress within the deadline (the message says how far it got)."""

    code = "LOADING_TIMEOUT"
    exit_code = ExitCode.WORKER


class InsufficientRam(RbeeError):
    """The model (weights plus KV cache) needs more free RAM than the machine has."""

    code = "INSUFFICIENT_RAM"
    exit_code = ExitCode.RESOURCES


class InsufficientVram(RbeeError):
    """The model (weights plus KV cache) needs more free GPU memory than the device has."""

    code = "INSUFFICIENT_VRAM"
    exit_code = ExitCode.RESOURCES


class InsufficientDisk(RbeeError):
    """A download would not fit on the disk holding the models directory."""

    code = "INSUFFICIENT_DISK"
    exit_code = ExitCode.RESOURCES


class BackendUnavailable(RbeeError):
    """The requested backend or device does not exist on this hive (never a silent CPU run)."""

    code = "BACKEND_UNAVAILABLE"
    exit_code = ExitCode.RESOURCES


class ModelAmbiguous(RbeeError):
    """A reference matches no GGUF file or several equally; the message lists the files."""

    code = "MODEL_AMBIGUOUS"
    exit_code = ExitCode.MODEL


class ChecksumMismatch(RbeeError):
    """A downloaded file's sha256 differs from the one the hub published; it was deleted."""

    code = "CHECKSUM_MISMATCH"
    exit_code = ExitCode.DOWNLOAD
    default_retryable = True


class DownloadFailed(RbeeError):
    """A download failed after its bounded retries (network, stall or server error)."""

    code = "DOWNLOAD_FAILED"
    exit_code = ExitCode.DOWNLOAD
    default_retryable = True


class AccessDenied(RbeeError):
    """The peer refused us: a gated or private repo, or a key without the needed role."""

    code = "ACCESS_DENIED"
    exit_code = ExitCode.ACCESS


class HiveKeyChanged(RbeeError):
    """A hive's public key differs from the one pinned when it was first trusted."""

    code = "HIVE_KEY_CHANGED"
    exit_code = ExitCode.ACCESS


class Timeout(RbeeError):
    """A bounded wait ran out (the message says which one)."""

    code = "TIMEOUT"
    default_retryable = True


class CannotListen(RbeeError):
    """A socket could not be bound: the port is taken or the machine has no such address."""

    code = "CANNOT_LISTEN"
    exit_code = ExitCode.NETWORK


class CatalogCorrupt(RbeeError):
    """The catalog database cannot be read; the model files it pointed to are untouched."""

    code = "CATALOG_CORRUPT"


class OutputFailed(RbeeError):
    """Writing the output failed: stdout was closed early (``| head``) or its disk is full."""

    code = "OUTPUT_FAILED"


class JobStopped(RbeeError):
    """The hive ended the job, not its owner: the hive shut down, or an admin stopped the
    worker or canceled the job. The partial text is saved."""

    code = "JOB_STOPPED"
    exit_code = ExitCode.STOPPED


class Canceled(RbeeError):
    """The job was canceled by the person or program that asked for it."""

    code = "CANCELED"
    exit_code = ExitCode.CANCELED


class InternalError(RbeeError):
    """A bug: something rbee did not expect. The message carries the detail."""

    code = "INTERNAL"

    @classmethod
    def of(cls, exc: BaseException) -> RbeeError:
        """``exc`` as rbee reports it: an RbeeError as it is, anything else as a bug that
        names its type (what a daemon answers instead of dying)."""
        if isinstance(exc, RbeeError):
            return exc
        return cls(f"{type(exc).__name__}: {exc}")


def error_from_code(
    code: str,
    message: str,
    *,
    suggestion: str = "",
    retryable: bool | None = None,
    retry_after_s: float = 0.0,
) -> RbeeError:
    """Rebuild the exception for a code received over the wire (unknown codes stay visible)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        return InternalError(f"{code}: {message}", suggestion=suggestion, retryable=retryable)
    return cls(message, suggestion=suggestion, retryable=retryable, retry_after_s=retry_after_s)
