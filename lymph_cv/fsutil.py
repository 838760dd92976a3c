"""Atomic file and directory writes: build under a temporary sibling name, rename on success.

A crash or an exception therefore never leaves a half-written file under its final name,
and a rerun never sees a partial output as finished work.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]

#: Marker in temporary names, so leftovers of a killed process are recognisable.
TEMP_MARKER = ".tmp-"


def temp_sibling(final: PathLike) -> Path:
    """A fresh, unused path next to ``final`` (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_path(source: PathLike, final: PathLike) -> None:
    """Move ``source`` onto ``final``; an existing directory at ``final`` is replaced."""
    source, final = Path(source), Path(final)
    if final.is_dir() and not final.is_symlink():
        # os.replace cannot overwrite a non-empty directory: move the old one aside first,
        # so that ``final`` is missing only for the instant between the two renames.
        old = temp_sibling(final)
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
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(final)
    try:
        yield temp
        if not temp.exists():
            raise FileNotFoundError(f"{temp}: nothing was written for {final}")
        replace_path(temp, final)
    except BaseException:
        remove_path(temp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (with a final newline) atomically."""
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
    return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete temporaries in ``folder`` left by killed processes (their pid is gone); returns them."""
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
