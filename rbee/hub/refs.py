"""Hub model references, and which GGUF file(s) of a repo one of them means. Pure: no I/O.

A reference names a repo on the Hugging Face Hub and, optionally, what to take from it::

    hf:ORG/REPO                      the preferred quantization (QUANT_PREFERENCE)
    hf:ORG/REPO:Q8_0                 the GGUF whose name carries that quant (case-insensitive)
    hf:ORG/REPO/sub/dir/FILE.gguf    exactly that file
    ...@REVISION                     any of the above at a branch, tag or commit (default: main)

A bare ``ORG/REPO[...]`` means the same as ``hf:ORG/REPO[...]``. References arrive from other
machines, and their parts become URL paths and then local paths, so they are validated strictly
here, before anything is fetched: a reference that parses can never name a path outside a repo.

A split GGUF (``NAME-00001-of-00003.gguf`` …) is one model: choosing it returns every part, in
order, and only when the repo holds the whole set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rbee.errors import InvalidRequest, ModelAmbiguous, ModelNotFound

HF_PREFIX = "hf:"
DEFAULT_REVISION = "main"
GGUF_SUFFIX = ".gguf"
MAX_REFERENCE_CHARS = 2048
MAX_REPO_PART_CHARS = 96  # the Hub's own limit for an org and for a repo name
MAX_FILE_PATH_CHARS = 1024
MAX_FILE_PART_CHARS = 255
MAX_REVISION_CHARS = 255
MAX_QUANT_CHARS = 32
MAX_LISTED_FILES = 12  # how many file names an error message lists before "… and N more"

# Picked when a reference names no quant: the first one the repo has wins. Q4_K_M first because
# it is the usual balance of size and quality for llama.cpp; then nearby k-quants, then bigger
# and more exact ones, then smaller ones, and the unquantized formats last (they are huge).
QUANT_PREFERENCE: tuple[str, ...] = (
    "Q4_K_M",
    "Q4_K_S",
    "Q5_K_M",
    "Q4_0",
    "Q5_K_S",
    "Q6_K",
    "Q8_0",
    "Q5_0",
    "Q4_1",
    "Q3_K_M",
    "IQ4_XS",
    "IQ4_NL",
    "Q2_K",
    "F16",
    "BF16",
    "F32",
)

# GGUF files that are not language models on their own (vision projectors): never picked by
# default, only when a reference names them exactly.
AUXILIARY_PREFIXES = ("mmproj",)

REFERENCE_FORMS = "hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf, each with @REVISION"

_REPO_PART = re.compile(r"[A-Za-z0-9._-]+")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,~()\[\]-]*")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")
# A quant is letters then a digit (Q4, IQ4, BF16, MXFP4 …), then letters, digits and '_', with
# optional WORD- prefixes (UD-Q4_K_XL). Requiring the digit keeps "K_M" from matching Q4_K_M.
_QUANT = re.compile(r"(?:[A-Za-z]+-)*[A-Za-z]+[0-9][A-Za-z0-9_]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_SPLIT = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    """A validated reference to a model on the Hub (build one with :func:`parse_reference`).

    At most one of ``quant`` and ``filename`` is set; ``quant`` is upper case; ``revision`` None
    means the default branch, ``main``. Building one validates every field and names every
    problem, so a ``HubRef`` that exists is safe to turn into URLs and local paths.
    """

    repo: str
    quant: str | None = None
    filename: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        problems = reference_problems(self.repo, self.quant, self.filename, self.revision)
        if problems:
            raise InvalidRequest(
                f"invalid Hub reference {self.canonical()!r}: {'; '.join(problems)}",
                suggestion=f"use {REFERENCE_FORMS}",
            )

    @property
    def revision_or_default(self) -> str:
        """The revision to ask the Hub for."""
        return self.revision or DEFAULT_REVISION

    def canonical(self) -> str:
        """The one spelling of this reference (``hf:`` prefix, quant upper case)."""
        text = HF_PREFIX + self.repo
        if self.quant is not None:
            text += f":{self.quant}"
        if self.filename is not None:
            text += f"/{self.filename}"
        if self.revision is not None:
            text += f"@{self.revision}"
        return text

    def with_filename(self, filename: str) -> HubRef:
        """This reference narrowed to one exact file (for "pick one with …" suggestions)."""
        return HubRef(self.repo, None, filename, self.revision)


def is_hub_reference(text: str) -> bool:
    """Whether a model reference is meant for the Hub (``hf:…`` or ``ORG/REPO…``) rather than a
    catalog name (which has no '/') or another scheme such as ``file:``; it may still be invalid.
    """
    body = text.strip()
    if body.startswith(HF_PREFIX):
        return True
    scheme = _SCHEME.match(body)
    return "/" in body and not (scheme and body.index(":") < body.index("/"))


def parse_reference(text: str) -> HubRef:
    """Parse ``hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]`` (``hf:`` optional); InvalidRequest
    naming what is wrong otherwise."""
    raw = text.strip()
    if len(raw) > MAX_REFERENCE_CHARS:
        raise _invalid(raw[:64] + "…", [f"longer than {MAX_REFERENCE_CHARS} characters"])
    body = raw.removeprefix(HF_PREFIX)
    scheme = _SCHEME.match(body)
    if scheme and ("/" not in body or body.index(":") < body.index("/")):
        raise _invalid(
            raw, [f"unknown prefix {scheme.group()!r} (a Hub reference is {HF_PREFIX}ORG/REPO)"]
        )
    body, at, revision = body.partition("@")
    parts = body.split("/")
    if len(parts) < 2:
        raise _invalid(raw, ["expected ORG/REPO"])
    org, name, rest = parts[0], parts[1], parts[2:]
    quant: str | None = None
    if ":" in name:
        name, _, quant = name.partition(":")
        if rest:
            raise _invalid(raw, ["name either a :QUANT or a /FILE.gguf, not both"])
    filename = "/".join(rest) if rest else None
    repo = f"{org}/{name}"
    quant = quant.upper() if quant else quant
    problems = reference_problems(repo, quant, filename, revision if at else None)
    if filename is not None and ":" in filename:
        problems.append("':' is not allowed in a file path (name either a :QUANT or a file)")
    if problems:
        raise _invalid(raw, problems)
    return HubRef(repo, quant, filename, revision or None)


def choose_gguf(files: Sequence[str], ref: HubRef) -> list[str]:
    """The file(s) of a repo that ``ref`` means, in download order.

    An exact filename picks that file; a quant picks the one model whose path carries it as a
    token (see :func:`has_quant`); no quant walks :data:`QUANT_PREFERENCE`. A split model comes
    back as all its parts, and only when the set is complete. Raises ModelNotFound (nothing
    matches, or parts are missing) or ModelAmbiguous (several models match equally), each
    listing what the repo holds.
    """
    models = group_models(files)
    if not models:
        raise ModelNotFound(
            f"{ref.repo} has no GGUF file (it holds: {_listing(files)})",
            suggestion="rbee runs GGUF models; look for a repo whose name ends in -GGUF",
        )
    if ref.filename is not None:
        model = next((m for m in models if ref.filename in m.files), None)
        if model is None:
            raise ModelNotFound(
                f"{ref.repo} has no file {ref.filename!r} (GGUF files: {_listing(_names(models))})"
            )
        return _complete(model, ref)
    if ref.quant is not None:
        matches = [m for m in models if has_quant(m.stem, ref.quant)]
        if not matches:
            raise ModelNotFound(
                f"{ref.repo} has no GGUF file for quant {ref.quant} "
                f"(GGUF files: {_listing(_names(models))})",
                suggestion="name another :QUANT, or an exact file with hf:ORG/REPO/FILE.gguf",
            )
        return _complete(_only(matches, ref, f"quant {ref.quant}"), ref)
    primary = [m for m in models if not m.auxiliary] or models
    if len(primary) == 1:
        return _complete(primary[0], ref)
    for quant in QUANT_PREFERENCE:
        matches = [m for m in primary if has_quant(m.stem, quant)]
        if matches:
            return _complete(_only(matches, ref, f"the preferred quant {quant}"), ref)
    raise _ambiguous(primary, ref, "none of the preferred quants")


@dataclass(frozen=True)
class GGUFModel:
    """One loadable model in a repo: a single GGUF file, or the parts of a split one.

    ``stem`` is the path without ``.gguf`` and without the split suffix (what quants are matched
    against); ``missing`` names the parts of a split set that the repo lacks.
    """

    stem: str
    files: tuple[str, ...]
    missing: tuple[str, ...] = ()

    @property
    def auxiliary(self) -> bool:
        """True for GGUFs that are not a model on their own (vision projectors)."""
        return self.stem.rpartition("/")[2].lower().startswith(AUXILIARY_PREFIXES)

    def describe(self) -> str:
        """The model as listed in messages: its file, or its first part and the part count."""
        if len(self.files) + len(self.missing) == 1:
            return self.files[0]
        return f"{self.files[0]} (+{len(self.files) + len(self.missing) - 1} parts)"


def group_models(files: Iterable[str]) -> list[GGUFModel]:
    """The GGUF models among a repo's files, split parts grouped into one model, sorted by path."""
    singles: list[GGUFModel] = []
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for name in files:
        if not name.lower().endswith(GGUF_SUFFIX):
            continue
        match = _SPLIT.fullmatch(name)
        index, count = (int(match["index"]), int(match["count"])) if match else (0, 0)
        if match and 1 <= index <= count:
            splits.setdefault((match["stem"], count), {})[index] = name
        else:
            singles.append(GGUFModel(name[: -len(GGUF_SUFFIX)], (name,)))
    for (stem, count), parts in splits.items():
        missing = tuple(
            f"{stem}-{i:05d}-of-{count:05d}{GGUF_SUFFIX}"
            for i in range(1, count + 1)
            if i not in parts
        )
        singles.append(GGUFModel(stem, tuple(parts[i] for i in sorted(parts)), missing))
    return sorted(singles, key=lambda m: m.files[0])


def has_quant(stem: str, quant: str) -> bool:
    """Whether a file path (without .gguf) carries ``quant`` as a token, ignoring case.

    On the left the quant must follow the start or a non-alphanumeric character (``.-_/``), so
    ``Q4_K_M`` does not match ``IQ4_K_M``. On the right it must be followed by the end or by
    ``.``, ``-`` or ``/`` but not ``_``, which would continue the quant's name: ``Q4_K`` does
    not match ``Q4_K_M`` and ``Q4_0`` does not match ``Q4_0_4_4``.
    """
    pattern = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])"
    return re.search(pattern, stem, re.IGNORECASE) is not None


def _complete(model: GGUFModel, ref: HubRef) -> list[str]:
    if model.missing:
        raise ModelNotFound(
            f"{ref.repo} holds only part of the split model {model.stem}: "
            f"missing {_listing(model.missing)}",
            suggestion="the upload may still be in progress; try again later or pick another file",
        )
    return list(model.files)


def _only(matches: list[GGUFModel], ref: HubRef, what: str) -> GGUFModel:
    if len(matches) > 1:
        raise _ambiguous(matches, ref, f"{len(matches)} files for {what}")
    return matches[0]


def _ambiguous(models: list[GGUFModel], ref: HubRef, why: str) -> ModelAmbiguous:
    example = ref.with_filename(models[0].files[0]).canonical()
    return ModelAmbiguous(
        f"{ref.repo} has {why}; it holds: {_listing([m.describe() for m in models])}",
        suggestion=f"name one file, e.g. {example}, or a quant with hf:ORG/REPO:QUANT",
    )


def _names(models: Iterable[GGUFModel]) -> list[str]:
    return [m.describe() for m in models]


def _listing(names: Sequence[str]) -> str:
    if not names:
        return "nothing"
    shown = ", ".join(names[:MAX_LISTED_FILES])
    more = len(names) - MAX_LISTED_FILES
    return f"{shown}, … and {more} more" if more > 0 else shown


def _invalid(text: str, problems: list[str]) -> InvalidRequest:
    return InvalidRequest(
        f"invalid Hub reference {text!r}: {'; '.join(problems)}",
        suggestion=f"use {REFERENCE_FORMS}",
    )


def reference_problems(
    repo: str, quant: str | None, filename: str | None, revision: str | None
) -> list[str]:
    """Everything wrong with a reference's fields (empty when they are valid)."""
    problems: list[str] = []
    org, _, name = repo.partition("/")
    if "/" not in repo:
        problems.append("the repo must be ORG/REPO")
    for label, part in (("org", org), ("repo name", name)):
        problems += _repo_part_problems(label, part)
    if quant is not None and filename is not None:
        problems.append("name either a :QUANT or a /FILE.gguf, not both")
    if quant is not None and (len(quant) > MAX_QUANT_CHARS or not _QUANT.fullmatch(quant)):
        problems.append(f"quant {quant!r} is not a quant name like Q4_K_M, IQ4_XS or F16")
    if filename is not None:
        problems += _file_problems(filename)
    if revision is not None:
        problems += _revision_problems(revision)
    return problems


def _repo_part_problems(label: str, part: str) -> list[str]:
    if not part:
        return [f"empty {label}"]
    if len(part) > MAX_REPO_PART_CHARS:
        return [f"{label} longer than {MAX_REPO_PART_CHARS} characters"]
    if not _REPO_PART.fullmatch(part):
        return [f"{label} {part!r} may hold only letters, digits, '-', '_' and '.'"]
    if part[0] in "-." or part[-1] in "-.":
        return [f"{label} {part!r} may not start or end with '-' or '.'"]
    if ".." in part or "--" in part:
        return [f"{label} {part!r} may not contain '..' or '--'"]
    return []


def _file_problems(path: str) -> list[str]:
    if not path:
        return ["empty file path"]
    if len(path) > MAX_FILE_PATH_CHARS:
        return [f"file path longer than {MAX_FILE_PATH_CHARS} characters"]
    if path.startswith("/"):
        return [f"file path {path!r} must be relative to the repo"]
    if "\\" in path:
        return [f"file path {path!r} may not contain a backslash"]
    if ".." in path:
        return [f"file path {path!r} may not contain '..'"]
    problems = []
    for part in path.split("/"):
        if not part:
            problems.append(f"file path {path!r} has an empty folder name")
        elif len(part) > MAX_FILE_PART_CHARS:
            problems.append(f"a name in file path {path!r} is over {MAX_FILE_PART_CHARS} chars")
        elif not _FILE_PART.fullmatch(part):
            problems.append(
                f"{part!r} in file path {path!r}: use letters, digits and ._+=,~()[]- "
                "(not first: '.', '-')"
            )
    if not path.lower().endswith(GGUF_SUFFIX):
        problems.append(f"file path {path!r} must end in {GGUF_SUFFIX}")
    return problems


def _revision_problems(revision: str) -> list[str]:
    if not revision:
        return ["empty revision after '@'"]
    if len(revision) > MAX_REVISION_CHARS:
        return [f"revision longer than {MAX_REVISION_CHARS} characters"]
    if not _REVISION.fullmatch(revision):
        return [f"revision {revision!r}: use a branch, tag or commit (letters, digits, ._/-)"]
    if ".." in revision or "//" in revision or "/." in revision:
        return [f"revision {revision!r} may not contain '..', '//' or '/.'"]
    if revision.endswith(("/", ".", ".lock")):
        return [f"revision {revision!r} may not end in '/', '.' or '.lock'"]
    return []
