"""Small file helpers shared by the library, the CLI and the trainer: atomic writes, the user
cache folder, and content fingerprints of files remembered by (path, size, mtime).

One function writes a file atomically (:func:`atomic_write_text`, with
:func:`atomic_write_json` on top): the text goes to a temporary file in the same folder that is
then renamed over the target, so a reader sees the old file or the whole new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["atomic_write_json", "atomic_write_text", "file_sha256", "user_cache_dir"]

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
                logger.warning("cannot remember the hash of %s in %s: %s", p, _memo_path(), e)
    return hexdigest
