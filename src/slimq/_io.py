"""The one place that writes files: atomically, so readers see the old file or the new one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .errors import SlimqError

__all__ = ["atomic_write_bytes", "atomic_write_text", "check_writable_dir", "temp_path_for"]

PathLike = Union[str, "os.PathLike[str]"]


def temp_path_for(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process, so renames stay on one filesystem."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def check_writable_dir(path: PathLike, what: str, error: type[SlimqError] = SlimqError) -> Path:
    """Return ``path`` as a Path after checking its folder exists and is writable.

    Raises:
        error: naming ``what`` and the folder, before anything is written.
    """
    p = Path(os.fspath(path))
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise error(f"{what} '{p}': folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{what} '{p}': folder '{folder}' is not writable")
    if p.is_dir():
        raise error(f"{what} '{p}' is a folder; give a file path")
    return p


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename.

    A crash or exception at any point leaves the previous file intact; the temp file is removed
    on failure.
    """
    path = Path(os.fspath(path))
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))
