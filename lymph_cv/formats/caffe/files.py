"""Reading Caffe's files: bytes or text with one-line errors, strict binary protobuf parsing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Type, TypeVar, Union

from google.protobuf.message import Message

from lymph_cv.errors import FormatError

PathLike = Union[str, os.PathLike]
M = TypeVar("M", bound=Message)


def read_bytes(path: PathLike, expected: str) -> bytes:
    """A file's bytes; FormatError naming the file (and what was ``expected``) when unreadable."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise FormatError(f"no such file; {expected}", path) from exc
    except IsADirectoryError as exc:
        raise FormatError(f"is a directory; {expected}", path) from exc
    except OSError as exc:
        raise FormatError(f"cannot read ({exc.strerror}); {expected}", path) from exc


def read_text(path: PathLike, expected: str) -> str:
    """A UTF-8 file's text; FormatError when unreadable or binary."""
    try:
        return read_bytes(path, expected).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"is not a text file; {expected}", path) from exc


def has_unknown_fields(message: Message) -> bool:
    """True when ``message`` carries top-level fields our schema does not know (a wrong-kind hint)."""
    from google.protobuf import unknown_fields

    return len(unknown_fields.UnknownFieldSet(message)) > 0


def parse_binary(message_class: Type[M], data: bytes, path: Optional[PathLike], expected: str) -> M:
    """Parse ``data`` as ``message_class``, rejecting malformed bytes and fields foreign to it.

    Our schema models every top-level field of the messages Caffe writes to files, so an
    unknown top-level field means the bytes are some other kind of file.
    """
    message = message_class()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # DecodeError / RuntimeError, depending on the protobuf runtime
        raise FormatError(f"{expected}; cannot parse ({exc})", path) from exc
    if has_unknown_fields(message):
        raise FormatError(f"{expected}; holds fields a {message_class.__name__} does not have", path)
    return message
