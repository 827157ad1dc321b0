"""The one place that writes files: atomically, so readers see the old file or the new one."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Union

from .errors import SlimqError

__all__ = ["FileTransaction", "atomic_write_bytes", "atomic_write_text", "check_writable_dir", "read_text_file",
           "temp_path_for"]

PathLike = Union[str, "os.PathLike[str]"]


def temp_path_for(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process, so renames stay on one filesystem."""
    return path.with_name(_private_prefix("write") + path.name)


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
        with tempfile.NamedTemporaryFile(dir=folder, prefix=_private_prefix("probe")):
            pass
    except OSError as exc:
        raise error(f"{what} '{p}': folder '{folder}' is not writable ({exc.strerror})") from None
    return p


def read_text_file(path: PathLike, what: str, error: type[SlimqError], hint: str) -> str:
    """The UTF-8 text of ``path`` (a file or a pipe such as ``/dev/stdin``), without a leading BOM.

    Raises:
        error: the path is missing, a folder, unreadable or not UTF-8; the message names it and
            ends with ``hint``.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        raise error(f"{what} '{p}' is a folder; {hint}")
    if not os.path.exists(p):
        raise error(f"{what} '{p}' does not exist; {hint}")
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise error(f"{what} '{p}' cannot be read: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{p}:{line}: {what} is not valid UTF-8 text") from None
    return text[1:] if text.startswith("\ufeff") else text  # editors on Windows write a BOM


def _private_prefix(kind: str) -> str:
    """Name prefix of this process's temp files and staging folders: the pid lets a later writer
    recognise (and remove) the leftovers of a killed one."""
    return f".slimq-{kind}-{os.getpid()}-"


def _writer_pid(name: str) -> int | None:
    """The pid in the name of a temp file or folder slimq writes (``.slimq-<kind>-<pid>-*``)."""
    m = re.match(r"\.slimq-(?:probe|stage|write)-(\d+)-", name)
    return None if m is None else int(m.group(1))


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's live process
        pass
    return False


def _remove_stale_temps(folder: Path) -> None:
    """Temp files, probes and staging folders left in ``folder`` by writers that were killed
    (called where files are written: :func:`atomic_write_bytes`, :class:`FileTransaction`)."""
    for tmp in folder.glob(".slimq-*"):
        pid = _writer_pid(tmp.name)
        if pid is None or pid == os.getpid() or not _process_gone(pid):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink()
            except OSError:
                pass


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename.

    A crash or exception at any point leaves the previous file intact; the temp file is removed
    on failure.
    """
    path = Path(os.fspath(path))
    tmp = temp_path_for(path)
    _remove_stale_temps(path.parent)
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


class FileTransaction:
    """Files written as one unit: staged under temporary names next to their final place, then
    renamed into place together by :meth:`commit` (each rename atomic). Until then no final file
    is touched; :meth:`abort` (also on leaving a ``with`` block with an exception) deletes the
    staged files.

    Staging happens in a private folder beside each final folder (same filesystem), so a file and
    its companions (``model.onnx`` and ``model.onnx.data``) keep their relative names.
    """

    def __init__(self) -> None:
        self._folders: dict = {}
        self._staged: list = []  # (staged path, final path), in commit order

    def path(self, final: PathLike) -> Path:
        """Where to write the staged version of ``final`` (its companions go next to it)."""
        final = Path(os.fspath(final))
        folder = final.parent if str(final.parent) else Path(".")
        tmp = self._folders.get(folder)
        if tmp is None:
            _remove_stale_temps(folder)
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=_private_prefix("stage")))
            self._folders[folder] = tmp
        staged = tmp / final.name
        self._staged.append((staged, final))
        return staged

    def text(self, final: PathLike, text: str) -> None:
        """Stage ``text`` (UTF-8) as the new content of ``final``."""
        staged = self.path(final)
        with open(staged, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        """Rename every staged file (and companions created beside it) into place."""
        for staged, final in self._staged:
            for companion in sorted(staged.parent.glob(staged.name + ".*")):
                os.replace(companion, final.with_name(companion.name))
            if staged.exists():
                os.replace(staged, final)
        self.abort()

    def abort(self) -> None:
        for tmp in self._folders.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self._folders.clear()
        self._staged.clear()

    def __enter__(self) -> "FileTransaction":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
