"""Reading the text files users hand us and checking the paths we will write, in one place.

Every reader of a user's CSV/JSON goes through :func:`read_text` (UTF-8 with or without a
byte-order mark; gzip, other binary files and other encodings named as such; a FIFO or
device is refused instead of blocking), :func:`loads_json` (duplicate keys refused) and
:func:`parse_number` (no ``1_0``). Every command checks its output paths with
:func:`check_writable` before any image is decoded, so a permission problem never wastes a run.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import DatasetError, InvalidInputError, NearIDError

_UTF8_BOM = b"\xef\xbb\xbf"
_MAGIC = {  # leading bytes -> what the file is
    b"\x1f\x8b": "a gzip-compressed file (decompress it first: gunzip)",
    b"PK\x03\x04": "a zip archive (an .xlsx workbook? export it as CSV UTF-8)",
    b"\x80\x02": "a Python pickle",
    b"\x80\x03": "a Python pickle",
    b"\x80\x04": "a Python pickle",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"SQLite format 3\x00": "an SQLite database",
    b"PAR1": "a Parquet file",
}
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def regular_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (``None``: it is a regular file, links followed).

    Checked before opening, because opening a FIFO blocks until a writer comes."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return "is a broken symbolic link (its target does not exist)" if p.is_symlink() else "file does not exist"
    except RuntimeError:
        return "is a symbolic link loop"
    except OSError as e:
        if e.errno == 40:  # ELOOP
            return "is a symbolic link loop"
        return f"cannot be examined ({e.strerror or e})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def read_text(path: str | Path, what: str, error: type[NearIDError] = DatasetError) -> str:
    """The text of a user's UTF-8 file (a leading byte-order mark, as Excel writes, is dropped;
    a file named ``*.gz`` is decompressed first).

    Raises:
        ``error``: missing file, not a regular file, unreadable, a binary or compressed file,
            or text in another encoding; the message names the file and what to do.
    """
    p = Path(path)
    problem = regular_file_problem(p)
    if problem is not None:
        raise error(f"{what} {p}: {problem}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from e
    if p.name.endswith(".gz"):  # named as compressed: read through gzip
        import gzip
        import zlib

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise error(f"{what} {p} is named .gz but is not a readable gzip file ({e})") from e
    return decode_text(data, f"{what} {p}", error)


def decode_text(data: bytes, where: str, error: type[NearIDError] = DatasetError) -> str:
    """Bytes of a text file -> str (see :func:`read_text`); ``where`` names the file."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            raise error(f"{where} is {kind}, not a UTF-8 text file")
    if data.startswith(_UTF16_BOMS):
        raise error(f"{where} is UTF-16 text; save it as UTF-8")
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    if b"\x00" in data[:65536]:
        raise error(f"{where} is a binary file (it holds NUL bytes), not a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(
            f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} is not valid UTF-8 "
            "(a latin-1/Windows-1252 export?); save the file as UTF-8"
        ) from e


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads_json(text: str, where: str, error: type[NearIDError] = DatasetError) -> Any:
    """Parse JSON, refusing an object that repeats a key (the last value would win silently).

    Raises:
        ``error``: invalid JSON (line and column named) or a duplicate key (the key named).
    """
    import json

    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as e:
        raise error(f"{where}: key {e.key!r} appears twice in one JSON object; keep one") from e
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise error(f"{where}: JSON nested too deeply") from e


def read_json(path: str | Path, what: str, error: type[NearIDError] = DatasetError) -> Any:
    """:func:`read_text` + :func:`loads_json`."""
    return loads_json(read_text(path, what, error), f"{what} {path}", error)


# A decimal number as people write it: no underscores, no hex, no surrounding words.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


def parse_number(text: str) -> float:
    """``float(text)`` for plain decimal notation only (Python's ``float`` reads ``1_0`` as 10).

    Raises:
        ValueError: anything else (callers name the file, line and column).
    """
    stripped = text.strip()
    if not _NUMBER.fullmatch(stripped):
        raise ValueError(f"{text!r} is not a decimal number")
    return float(stripped)


def check_writable(path: str | Path, what: str, existing_ok: bool = True) -> None:
    """Refuse an output path this process cannot write, before any work is done.

    Creates missing parent folders (the writers would create them anyway) and tries a real
    file creation in the folder (``os.access`` says yes to root on a read-only mount or
    ``/proc``). An existing file must be a regular file opened for appending without error.

    Raises:
        InvalidInputError: names the path, the reason and what to do.
    """
    p = Path(path)
    if p.is_dir():
        raise InvalidInputError(f"{what} {p} is a directory; give a file path")
    parent = p.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise InvalidInputError(
                    f"{what} {p}: {ancestor} is {'a file' if ancestor.is_file() else 'not a folder'}, "
                    "so no folder can be created there; choose another path"
                )
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"{what} {p}: cannot create its folder {parent} ({_reason(e)})") from e
    if p.exists() or p.is_symlink():
        problem = regular_file_problem(p)
        if problem is not None:
            raise InvalidInputError(f"{what} {p}: {problem}")
        if existing_ok:
            try:
                with open(p, "ab"):
                    pass
            except OSError as e:
                raise InvalidInputError(f"{what} {p} exists but cannot be written ({_reason(e)})") from e
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise InvalidInputError(f"{what} {p}: cannot create files in {parent} ({_reason(e)})") from e
    os.close(fd)
    os.unlink(probe)


def _reason(e: OSError) -> str:
    import errno

    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: choose a folder you can write or fix its permissions"
    if e.errno == errno.EROFS:
        return "read-only file system: choose another place"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)
