"""The one place that writes files: atomically, so readers see the old file or the new one."""
from __future__ import annotations

import os
import tempfile
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
    if p.is_dir():
        raise error(f"{what} '{p}' is a folder; give a file path")
    try:  # os.access says yes to root even on read-only folders: really try
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".slimq-probe-"):
            pass
    except OSError as exc:
        raise error(f"{what} '{p}': folder '{folder}' is not writable ({exc.strerror})") from None
    return p


def _remove_stale_temps(path: Path) -> None:
    """Temp files left by writers that were killed (their pid is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-4]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                tmp.unlink()
            except OSError:
                pass
        except PermissionError:
            pass


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename.

    A crash or exception at any point leaves the previous file intact; the temp file is removed
    on failure.
    """
    path = Path(os.fspath(path))
    tmp = temp_path_for(path)
    _remove_stale_temps(path)
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
