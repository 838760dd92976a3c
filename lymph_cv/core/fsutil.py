"""Atomic file and directory writes: build under a temporary sibling name, rename on success.

A crash or an exception therefore never leaves a half-written file under its final name,
and a rerun never sees a partial output as finished work.
"""
from __future__ import annotations

import contextlib
import errno
import os

from lymph_cv.core import faults
from lymph_cv.errors import LymphCVError

TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Iterator, Union

    PathLike = Union[str, os.PathLike]
else:  # the annotations are strings (PEP 563): the name only has to exist, for the modules importing it
    PathLike = "Union[str, os.PathLike]"

#: Marker in temporary names, so leftovers of a killed process are recognisable.
TEMP_MARKER = ".tmp-"


# Paths are handled with os.path here, pathlib only where a Path is returned: atomic_write_bytes is
# on the tools' start-up path (compute_image_mean writes its mean), and pathlib's import costs ~5 ms.

def _temp_name(final: str) -> str:
    folder, name = os.path.split(os.path.normpath(final))
    # os.urandom, not uuid: uuid imports platform, whose regexes cost every start-up (issue 17)
    return os.path.join(folder, f".{name}{TEMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}")


def temp_sibling(final: PathLike) -> Path:
    """A fresh, unused path next to ``final`` (same folder, so the rename is atomic)."""
    from pathlib import Path

    return Path(_temp_name(os.fspath(final)))


def _is_real_dir(path: PathLike) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def remove_path(path: PathLike) -> None:
    """Delete a file or directory tree if it exists."""
    if _is_real_dir(path):
        import shutil  # here, not at the top: this module is on every tool's start-up path

        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _make_folder(folder: PathLike) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise LymphCVError("is a file; expected a folder", folder) from None
    except OSError as exc:
        raise LymphCVError(f"cannot create folder ({os_reason(exc)})", folder) from None


def make_dirs(folder: PathLike) -> Path:
    """Create ``folder`` and its parents if missing; a failure is one :class:`LymphCVError` line."""
    from pathlib import Path

    folder = Path(folder)
    _make_folder(folder)
    return folder


def check_kind(final: PathLike, folder: bool) -> None:
    """Refuse to replace a folder by a file or a file by a folder (never delete the wrong kind)."""
    if folder and os.path.exists(final) and not os.path.isdir(final):
        raise LymphCVError("is a file; expected a folder (or a new name)", final)
    if not folder and os.path.isdir(final):
        raise LymphCVError("is a folder; expected a file name", final)


def replace_path(source: PathLike, final: PathLike) -> None:
    """Move ``source`` onto ``final``; an existing directory at ``final`` is replaced by a directory.

    A file never replaces a directory nor a directory a file (:class:`LymphCVError`).
    """
    check_kind(final, folder=_is_real_dir(source))
    if _is_real_dir(final):
        # os.replace cannot overwrite a non-empty directory: move the old one aside first,
        # so that ``final`` is missing only for the instant between the two renames.
        old = _temp_name(os.fspath(final))
        os.replace(final, old)
        try:
            os.replace(source, final)
        except BaseException:
            os.replace(old, final)
            raise
        remove_path(old)
    else:
        os.replace(source, final)


@contextlib.contextmanager
def atomic_path(final: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed onto ``final``.

    The caller creates a file or a directory at the yielded path.  On an exception the
    temporary is removed and ``final`` is left untouched.
    """
    from pathlib import Path

    with _atomic_name(os.fspath(final)) as temp:
        yield Path(temp)


@contextlib.contextmanager
def _atomic_name(final: str) -> Iterator[str]:
    """:func:`atomic_path` with names as strings (no pathlib: the tools' start-up path)."""
    _make_folder(os.path.dirname(os.path.normpath(final)) or os.curdir)
    temp = _temp_name(final)
    try:
        yield temp
        if not os.path.exists(temp):
            raise FileNotFoundError(f"{temp}: nothing was written for {final}")
        replace_path(temp, final)
    except BaseException:
        remove_path(temp)
        raise


def os_reason(exc: OSError) -> str:
    """The short reason of a failed write, for an error line (the file is named beside it)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return (exc.strerror or str(exc)).lower() if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) \
        else (exc.strerror or str(exc))


def write_error(exc: OSError, path: PathLike, what: str = "file") -> LymphCVError:
    """The one-line error for a write of ``path`` that failed with ``exc``."""
    if exc.errno == errno.ENOSPC:
        return LymphCVError("no space left on device", path)
    return LymphCVError(f"cannot write {what} ({os_reason(exc)})", path)


def write_all(handle, data) -> None:
    """Write every byte of ``data`` (bytes or a numpy array) to the binary ``handle`` and flush:
    unlike ``ndarray.tofile``, a short write (a full disk) is an OSError, never a truncated file."""
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    written = handle.write(view)
    if written is not None and written != len(view):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    handle.flush()


def atomic_write_bytes(path: PathLike, data, *, sync: bool = True) -> None:
    """Write ``data`` (bytes or a contiguous array) to ``path`` atomically (fsynced before the rename
    unless ``sync`` is False); a failed write is one :class:`LymphCVError` naming ``path``."""
    check_kind(path, folder=False)
    try:
        faults.before_write(path)
        with _atomic_name(os.fspath(path)) as temp:
            with open(temp, "wb") as handle:
                write_all(handle, data)
                if sync:
                    os.fsync(handle.fileno())
    except OSError as exc:  # a full disk, a read-only file system: one line, the final name
        raise write_error(exc, path) from None


def check_writable(folder: PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be created in it (before hours of work that
    would end in a failed write); one :class:`LymphCVError` line naming the folder otherwise."""
    folder = make_dirs(folder)
    probe = temp_sibling(folder / "write-probe")
    try:
        faults.before_write(folder / "write-probe")
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise LymphCVError(f"cannot write in this folder ({os_reason(exc)})", folder) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (with a final newline) atomically."""
    import json  # here, not at the top: this module is on every tool's start-up path

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def pid_alive(pid) -> bool:
    """Whether a process with this pid exists (``None`` or 0: no)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) is no writer any more
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete temporaries in ``folder`` left by killed processes (their pid is gone); returns them."""
    from pathlib import Path

    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        name = path.name
        if not name.startswith(".") or TEMP_MARKER not in name:
            continue
        pid_text = name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            remove_path(path)
            removed.append(path)
    return removed
