"""Reading the text files users hand us, checking the paths we will write, and writing files
atomically, in one place.

Every reader of a user's CSV/JSON goes through :func:`read_text` (UTF-8 with or without a
byte-order mark; gzip, other binary files and other encodings named as such; a FIFO or
device is refused instead of blocking), :func:`loads_json` (duplicate keys refused) and
:func:`parse_number` (no ``1_0``). Every command checks its output paths with
:func:`check_writable` before any image is decoded, so a permission problem never wastes a run.
One function writes a file atomically (:func:`atomic_write_text`, with :func:`atomic_write_json`
on top): a temporary file in the same folder renamed over the target, so a reader sees the old
file or the whole new one. :func:`file_sha256` hashes a file once per version (path, size,
mtime), remembered in :func:`user_cache_dir`. :func:`read_mapping_records` reads every mapping
file (``nearid score --mapping``, ``nearid consistency --mapping``): one shape, one reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DatasetError, InvalidInputError, NearIDError

_logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- atomic writes, cache folder, file hashes
CACHE_DIR_ENV_VAR = "NEARID_CACHE_DIR"
HASH_MEMO_ENV_VAR = "NEARID_HASH_MEMO"
_HASH_BLOCK = 1 << 20


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # interrupted before the rename: leave no partial file behind
            tmp.unlink()
    return path


def atomic_write_json(
    path: str | Path,
    data: Any,
    *,
    allow_nan: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``data`` as indented JSON (UTF-8, non-ASCII kept) atomically.

    ``allow_nan=False`` refuses NaN/infinity (strict JSON); ``default`` converts objects JSON
    cannot hold (e.g. ``str`` for paths)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=allow_nan, default=default) + "\n"
    return atomic_write_text(path, text)


def user_cache_dir() -> Path:
    """``$NEARID_CACHE_DIR``, else ``$XDG_CACHE_HOME/comfy_nearid`` (``~/.cache/comfy_nearid``)."""
    explicit = os.environ.get(CACHE_DIR_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "comfy_nearid"


_memo_lock = threading.Lock()
_memo: dict[str, str] = {}  # in-process: "path|size|mtime_ns" -> hex digest
_MEMO_FILE = "file_hashes.json"


def _memo_path() -> Path:
    """``$NEARID_HASH_MEMO``, else ``file_hashes.json`` in :func:`user_cache_dir`."""
    explicit = os.environ.get(HASH_MEMO_ENV_VAR)
    return Path(explicit).expanduser() if explicit else user_cache_dir() / _MEMO_FILE


def _read_memo_file() -> dict[str, str]:
    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_sha256(path: str | Path, *, remember: bool = True) -> str:
    """SHA-256 (hex) of a file's bytes, hashed once per file version.

    The digest is remembered under (absolute path, size, mtime in ns) in memory and, with
    ``remember``, in ``file_hashes.json`` in :func:`user_cache_dir` (or ``$NEARID_HASH_MEMO``); a file that changes gets
    a new size or mtime and so is hashed again. A memo that cannot be written is only logged.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    with _memo_lock:
        if key in _memo:
            return _memo[key]
        if remember:
            on_disk = _read_memo_file().get(key)
            if isinstance(on_disk, str) and len(on_disk) == 64:
                _memo[key] = on_disk
                return on_disk
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    hexdigest = digest.hexdigest()
    with _memo_lock:
        _memo[key] = hexdigest
        if remember:
            memo = _read_memo_file()
            # forget older versions of the same file
            memo = {k: v for k, v in memo.items() if not k.startswith(f"{p}|")}
            memo[key] = hexdigest
            try:
                atomic_write_json(_memo_path(), memo)
            except OSError as e:
                _logger.warning("cannot remember the hash of %s in %s: %s", p, _memo_path(), e)
    return hexdigest


# ============================================================================ mapping files
#: Several paths in one CSV cell (or one JSON string) are separated by this.
MAPPING_PATH_SEPARATOR = ";"
MAPPING_SUFFIXES = (".json", ".csv")


@dataclass(frozen=True)
class MappingRecord:
    """One entry of a mapping file: ``name`` (the key column's value), ``paths`` per path
    column (relative paths resolved against the file's folder), ``extra`` = the values of the
    other columns as text (``""`` where an entry leaves one out), ``where`` = file and
    line/entry, for messages."""

    name: str
    paths: dict[str, list[Path]]
    extra: dict[str, str]
    where: str


def split_paths(value: Any, where: str) -> list[str]:
    """A mapping cell -> its paths: a string (``;``-separated) or a JSON list of strings."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(MAPPING_PATH_SEPARATOR) if p.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise DatasetError(f"{where}: expected a path or a list of paths, got {value!r}")


def read_mapping_records(
    path: str | Path, *, key: str, path_fields: Sequence[str], extra: str = "refuse", what: str = "mapping file",
) -> tuple[list[MappingRecord], tuple[str, ...]]:
    """Read a mapping file: one record per CSV line or JSON entry, in file order.

    - JSON: ``{"<name>": {<path field>: PATHS, ...}, ...}``, or ``{"<name>": PATHS}`` when there
      is one path field, or a list of ``{"<key>": "<name>", <path field>: PATHS, ...}``.
    - CSV: a header holding ``key`` and every path field. PATHS: a path, ``;``-separated paths,
      or (JSON) a list of paths.

    Args:
        key: the column naming each entry (``subject``, ``set``).
        path_fields: the columns holding paths; every entry must have each of them.
        extra: what other columns do: ``refuse`` (an error), ``ignore`` or ``keep`` (returned
            in each record's ``extra``, JSON values must be text or numbers).
        what: how messages name the file.

    Returns:
        ``(records, extra column names in first-seen order)`` (no names unless ``keep``).

    Raises:
        DatasetError: missing or unreadable file, unknown format, missing fields, refused
            columns, an empty name; each names the file and the line or entry.
    """
    if extra not in ("refuse", "ignore", "keep"):
        raise InvalidInputError(f"extra must be 'refuse', 'ignore' or 'keep', got {extra!r}")
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in MAPPING_SUFFIXES:
        raise DatasetError(f"{what} {path}: unknown format {suffix!r}; use .json or .csv")
    required = (key, *path_fields)
    raw = _mapping_json(path, key, path_fields, what) if suffix == ".json" else _mapping_csv(path, required, what)
    records: list[MappingRecord] = []
    names: dict[str, None] = {}
    for where, rec in raw:
        missing = [f for f in required if f not in rec]
        others = [f for f in rec if f not in required]
        if missing or (others and extra == "refuse"):
            raise DatasetError(f"{where}: fields must be {sorted(required)}"
                               + (f"; missing {sorted(missing)}" if missing else "")
                               + (f"; unknown {sorted(others)}" if others and extra == "refuse" else ""))
        name = rec[key]
        name = name.strip() if isinstance(name, str) else name
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: {key!r} must be a non-empty name, got {rec[key]!r}")
        paths = {f: [Path(p) if Path(p).is_absolute() else path.parent / p
                     for p in split_paths(rec[f], f"{where}.{f}")] for f in path_fields}
        kept: dict[str, str] = {}
        if extra == "keep":
            for f in others:
                kept[f] = _extra_text(rec[f], f"{where}.{f}")
                names.setdefault(f, None)
        records.append(MappingRecord(name, paths, kept, where))
    if not records:
        raise DatasetError(f"{what} {path} lists no {key}")
    columns = tuple(names)
    for r in records:  # every record has every extra column ("" where an entry leaves it out)
        if len(r.extra) != len(columns):
            r.extra.update({c: "" for c in columns if c not in r.extra})
    return records, columns


def _extra_text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value).strip()
    raise DatasetError(f"{where}: an extra column must hold text or a number, got {value!r}")


def _mapping_json(path: Path, key: str, path_fields: Sequence[str], what: str) -> list[tuple[str, dict[str, Any]]]:
    data = read_json(path, what)
    if isinstance(data, dict):
        out = []
        for name, value in data.items():
            where = f"{what} {path}, {key} {name!r}"
            if isinstance(value, dict):
                if key in value:
                    raise DatasetError(f"{where}: the {key} is the object's name; remove the {key!r} field")
                out.append((where, {**value, key: name}))
            elif len(path_fields) == 1:
                out.append((where, {key: name, path_fields[0]: value}))
            else:
                raise DatasetError(f"{where}: expected an object with {sorted(path_fields)}, got {value!r}")
        return out
    if isinstance(data, list):
        out = []
        for i, rec in enumerate(data):
            where = f"{what} {path}, entry {i}"
            if not isinstance(rec, dict):
                raise DatasetError(f"{where}: expected an object with {sorted([key, *path_fields])}, got {rec!r}")
            out.append((where, rec))
        return out
    raise DatasetError(f"{what} {path}: expected a JSON object or list, got {type(data).__name__}")


def _mapping_csv(path: Path, required: Sequence[str], what: str) -> list[tuple[str, dict[str, Any]]]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""))
    try:
        header = [h.strip() for h in reader.fieldnames or []]
        duplicated = sorted({h for h in header if header.count(h) > 1})
        if not set(required) <= set(header) or duplicated or "" in header:
            problem = f"; repeated {duplicated}" if duplicated else ("; a column has no name" if "" in header else "")
            raise DatasetError(f"{what} {path}: header must hold {sorted(required)}, got {reader.fieldnames}{problem}")
        reader.fieldnames = header
        out = []
        for row in reader:
            where = f"{what} {path}, line {reader.line_num}"
            if None in row:
                raise DatasetError(f"{where}: more cells than the header has columns")
            out.append((where, {k: (v or "") for k, v in row.items()}))
    except csv.Error as e:
        raise DatasetError(f"{what} {path}, line {reader.line_num}: cannot read CSV ({e})") from e
    return out
