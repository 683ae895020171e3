"""Atomic file writes: a reader never sees half a file, and a failed write leaves the
old file (or no file) in place.

Every file the project writes over an earlier one goes through `staged`: checkpoints,
dataset descriptions, reports, exports. The new content is written to a temporary file
in the same folder and renamed over the real name only when the write succeeded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it when the block ends without error.

    Raise inside the block (e.g. when a check of the written file fails) to keep
    whatever `path` held before; the temporary file is removed either way. Nested
    blocks are renamed innermost first.

    Args:
        path: the file to write.
        fsync: flush the file to disk before the rename (checkpoints: a crash right
            after must not leave an empty file under the real name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with staged(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` atomically, flushed to disk before the rename."""
    with staged(path, fsync=True) as tmp:
        torch.save(obj, tmp)
    return Path(path)


class OutputError(ValueError):
    """An output that would be written over something it must not be, or cannot be
    written at all; the message names the path and the fix."""


def check_writable_dir(path: str | Path, flag: str = "--output") -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be written.

    The folder may not exist yet: its nearest existing parent must be writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; give a folder name")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {path}: {probe} is a file, so the folder cannot be made")
    # No write bit for anyone means "read-only" even to root, whom access() lets through.
    if not os.access(probe, os.W_OK | os.X_OK) or not probe.stat().st_mode & 0o222:
        raise OutputError(f"{flag} {path}: {probe} is not writable; choose another folder")
    return path


def check_writable_file(path: str | Path, flag: str = "--output") -> Path:
    """Refuse, before any work, an output file whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name")
    check_writable_dir(path.parent, flag=f"{flag} {path}: the folder")
    return path


def refuse_inputs(outputs: Iterable[Path], inputs: Iterable[Path], flag: str = "--output"):
    """Refuse outputs that would land on an input file: inputs are never written over."""
    taken = {p.resolve() for p in inputs}
    clash = [p for p in outputs if p.resolve() in taken]
    if clash:
        raise OutputError(
            f"{flag} would write {clash[0]} over the input of the same name"
            f"{f' (and {len(clash) - 1} more)' if len(clash) > 1 else ''}; inputs are never "
            "written over: choose another output folder"
        )
