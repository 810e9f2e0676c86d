"""Files given to a run: safe names under inputs/, the limits on them, and the tar they travel in.

A user's file name is untrusted text: it becomes one safe path component (no separators, no leading dots, no `..`,
no control characters, at most MAX_NAME_BYTES bytes), and names that clash in one batch are told apart as
`name (2).csv`. The bytes never pass through the server's memory whole: the tar for the sandbox is written to a
temporary file from the files on disk, in chunks.
"""

from __future__ import annotations

import mimetypes
import os
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

MAX_NAME_BYTES = 120  # well under NAME_MAX (255), so "name (12).csv" still fits
RESULTS_DIR = "results"  # inputs/results/run-N.json: earlier runs' result dicts
# Names the workspace uses itself inside a run's working directory: results/ under inputs/ (an upload named
# `results` made that directory impossible: FileExistsError in every later run), and inputs/ and outputs/ beside
# it (a file inputs/outputs would only mislead the planner). A file given one of them is renamed `NAME (upload)`.
RESERVED_NAMES = frozenset({RESULTS_DIR, "inputs", "outputs"})
RENAMED_SUFFIX = " (upload)"


class InputRefused(Exception):
    """The files are over a limit (or unreadable): the message is for the user, and nothing runs."""


@dataclass(frozen=True)
class InputFile:
    """One file for a run's inputs/: `name` relative to inputs/ (a safe name, or results/<safe name>)."""

    name: str
    path: Path  # where the server keeps the bytes (an upload, or a workspace blob)
    size: int
    origin: str = ""  # for the planner: "uploaded with run 1", "output of run 2", "result of run 2"
    sha256: str = ""  # the content's hash, when known (workspace blobs): previews are stored by it

    @property
    def mime(self) -> str:
        return mimetypes.guess_type(self.name)[0] or "application/octet-stream"


def safe_name(name: str, fallback: str = "file") -> str:
    """One path component a user's file name can safely become (see the module docstring)."""
    name = unicodedata.normalize("NFC", str(name))
    name = "".join("_" if ch in "/\\" else ch for ch in name)  # a/b and a\b are one name, not a path
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")  # control and format characters
    name = name.strip().lstrip(".").strip()  # no hidden files, no "." or ".."
    while ".." in name:
        name = name.replace("..", ".")
    if not name:
        name = fallback
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > 16:
        stem, ext = name, ""
    ext = f".{ext}" if ext else ""
    while len((stem + ext).encode()) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return (stem.rstrip() or fallback) + ext


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name (2).ext`, `name (3).ext`… the first not in `taken` (compared without case)."""
    lowered = {t.lower() for t in taken}
    if name.lower() not in lowered:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    ext = f".{ext}" if ext else ""
    number = 2
    while True:
        candidate = f"{stem} ({number}){ext}"
        if candidate.lower() not in lowered:
            return candidate
        number += 1


def workspace_name(name: str, taken: set[str]) -> str:
    """A safe name for a file joining a workspace: `safe_name`, renamed `NAME (upload)` if the workspace uses NAME
    itself (RESERVED_NAMES, compared without case), then made unique against `taken`."""
    name = safe_name(name)
    if name.lower() in RESERVED_NAMES:
        name += RENAMED_SUFFIX
    return unique_name(name, taken)


def renamed_note(names: Iterable[str]) -> str | None:
    """What the user is told about their files `workspace_name` renamed because of a reserved name, or None."""
    renamed = [n for n in names if RENAMED_SUFFIX in n and n.split(RENAMED_SUFFIX)[0].lower() in RESERVED_NAMES]
    if not renamed:
        return None
    told = "; ".join(f"{n.split(RENAMED_SUFFIX)[0]} is inputs/{n}" for n in renamed)
    return f"Renamed, as AutoCode's working directory uses the name itself: {told}."


def check_uploads(paths: Iterable[Path], max_mb: int, max_files: int) -> list[tuple[Path, int]]:
    """The files with their sizes, or InputRefused saying which limit a file is over (nothing is read)."""
    paths = list(paths)
    if len(paths) > max_files:
        raise InputRefused(f"{len(paths)} files is more than the {max_files} a task can take "
                           "(AUTOCODE_INPUT_MAX_FILES); nothing was run.")
    checked = []
    for path in paths:
        try:
            info = path.stat()
        except OSError as exc:
            raise InputRefused(f"cannot read {path}: {exc.strerror}; nothing was run.") from None
        if not path.is_file():
            raise InputRefused(f"{path} is not a regular file; nothing was run.")
        if info.st_size > max_mb * 1024 * 1024:
            raise InputRefused(f"{path.name} is {info.st_size / 1048576:.1f} MB, over the limit of {max_mb} MB a "
                               "file (AUTOCODE_INPUT_MAX_MB); nothing was run.")
        checked.append((path, info.st_size))
    return checked


def write_inputs_tar(files: list[InputFile], out: IO[bytes]) -> None:
    """A tar of `files` (regular members only, mode 0444) into `out`, read from disk in chunks."""
    with tarfile.open(fileobj=out, mode="w") as tar:
        dirs_added: set[str] = set()
        for item in files:
            parent = os.path.dirname(item.name)
            if parent and parent not in dirs_added:
                entry = tarfile.TarInfo(parent)
                entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(entry)
                dirs_added.add(parent)
            with open(item.path, "rb") as handle:
                entry = tarfile.TarInfo(item.name)
                entry.size = os.fstat(handle.fileno()).st_size
                entry.mode = 0o444
                tar.addfile(entry, handle)


__all__ = ["InputFile", "InputRefused", "RESERVED_NAMES", "RESULTS_DIR", "check_uploads", "renamed_note",
           "safe_name", "unique_name", "workspace_name", "write_inputs_tar"]
