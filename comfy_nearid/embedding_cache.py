"""A persistent embedding cache: one SQLite file shared by ``score``, ``eval`` and the nodes.

An entry is keyed by two strings:

- the **model identity** (``IdentityModel.identity``: backbone, head hash, readout and
  preprocessing; plus the dtype when it is not fp32, see :func:`model_cache_identity`). Each
  identity is a separate namespace; a lookup never returns a vector
  that another model produced, so changing the head or the preprocessing simply misses.
- the **content key** of the input, one kind for every door (``nearid score``, ``nearid
  eval``, the nodes): ``rgb8-sha256:<hex>`` of the decoded 8-bit RGB pixels
  (:func:`pixels_content_hash`), whether the image arrives as a file, a PIL image or a tensor
  (ComfyUI), so a folder scored by the CLI is free for the nodes and the other way round.
  A mask, when one is used, is appended as ``|mask-sha256:<hex>``. So that an unchanged file
  is not decoded again just to find its key, the cache remembers each file's pixel key under
  (path, size, mtime) (:meth:`EmbeddingCache.remembered_file_keys`).

Vectors are stored as little-endian float32 bytes with their dimension. The database runs in
WAL mode: any number of processes may read while one writes, and concurrent writers wait for
each other (``busy_timeout``) instead of failing. Entries are immutable (first write wins).
Each thread uses its own connection, so one :class:`EmbeddingCache` object can be shared by
the decode threads of the streaming scorer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import ConfigError, InvalidInputError

if TYPE_CHECKING:  # imported lazily at run time: the cache itself needs no torch
    import torch

__all__ = [
    "CACHE_ENV_VAR",
    "EmbeddingCache",
    "bytes_content_hash",
    "cached_embed",
    "decoded_file_key",
    "default_cache_path",
    "file_stat_key",
    "file_content_hash",
    "image_cache_keys",
    "mask_content_hash",
    "model_cache_identity",
    "pixels_content_hash",
]

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "NEARID_EMBEDDING_CACHE"
SCHEMA_VERSION = "1"
# SQLite's default limit on bound parameters is 32766 (999 before 3.32); stay well below.
_QUERY_CHUNK = 500
_HASH_BLOCK = 1 << 20


def default_cache_path() -> Path:
    """Where the cache lives unless a path is given.

    ``$NEARID_EMBEDDING_CACHE`` if set, else ``$XDG_CACHE_HOME/comfy_nearid/embeddings.sqlite``
    (``~/.cache/...`` when ``XDG_CACHE_HOME`` is unset).
    """
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "comfy_nearid" / "embeddings.sqlite"


def model_cache_identity(model: Any) -> str:
    """The namespace a model's embeddings live under: ``model.identity``, which names the
    backbone, its weights, the preprocessing, the readout, the head's hash and (when not fp32)
    the compute dtype, so fp32 and bf16 runs never share entries."""
    return model.identity


def bytes_content_hash(data: bytes) -> str:
    """Content key of raw file bytes: ``sha256:<64 hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_content_hash(path: str | Path) -> str:
    """Content key of a file (same value as :func:`bytes_content_hash` of its bytes).

    Raises:
        OSError: the file cannot be read (callers turn this into an error row or an
            :class:`~comfy_nearid.errors.ImageLoadError`).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def pixels_content_hash(pixels: np.ndarray) -> str:
    """Content key of decoded pixels: uint8 ``[H, W, 3]``; the shape is part of the key."""
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidInputError(
            f"pixels_content_hash: expected a uint8 [H, W, 3] array, got dtype {arr.dtype} "
            f"shape {arr.shape}"
        )
    digest = hashlib.sha256(f"rgb8:{arr.shape[0]}x{arr.shape[1]}:".encode())
    digest.update(arr.tobytes())
    return "rgb8-sha256:" + digest.hexdigest()


def mask_content_hash(mask: np.ndarray) -> str:
    """Content key of a mask: float ``[H, W]`` in 0..1 (hashed as float32)."""
    arr = np.ascontiguousarray(mask, dtype=np.float32)
    if arr.ndim != 2:
        raise InvalidInputError(f"mask_content_hash: expected a [H, W] mask, got shape {arr.shape}")
    digest = hashlib.sha256(f"mask32:{arr.shape[0]}x{arr.shape[1]}:".encode())
    digest.update(arr.tobytes())
    return "mask-sha256:" + digest.hexdigest()


class EmbeddingCache:
    """Embeddings keyed by (model identity, content key) in one SQLite file.

    Args:
        path: the database file; created (with its folder) unless ``readonly``.
        readonly: open without write access (a missing file then reads as empty).
        timeout_s: how long a writer waits for another process's write lock.

    Raises:
        ConfigError: the file exists but is not a cache database, or has another schema.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout_s: float = 60.0) -> None:
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, int, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._model_ids: dict[str, int] = {}
        if self.path.is_dir():
            raise ConfigError(f"embedding cache path {self.path} is a directory; give a file path")
        if not readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"embedding cache {self.path}: cannot create its folder {self.path.parent} "
                    f"({e.strerror or e}); choose another cache path (${CACHE_ENV_VAR} or --cache)"
                ) from e
            self._initialise_schema()
        elif self.path.exists():
            self._check_schema(self._connection())

    # ----------------------------------------------------------------- connections
    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (a forked child opens its own, never the parent's)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        try:
            if self.readonly:
                conn = sqlite3.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                    timeout=self.timeout_s, check_same_thread=False,
                )
            else:
                conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open embedding cache {self.path}: {e}") from e
        self._local.conn = conn
        self._local.pid = os.getpid()
        with self._lock:
            # Close the connections of threads that have ended (decode threads of past runs),
            # so a long-lived process (ComfyUI) does not collect open files.
            alive = []
            for thread, pid, old in self._connections:
                if thread.is_alive() or pid != os.getpid():
                    alive.append((thread, pid, old))
                else:
                    old.close()
            alive.append((threading.current_thread(), os.getpid(), conn))
            self._connections = alive
        return conn

    def _initialise_schema(self) -> None:
        conn = self._connection()
        try:
            # WAL: readers never block the writer nor each other (persistent per file).
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            with conn:
                conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS models (id INTEGER PRIMARY KEY, identity TEXT NOT NULL UNIQUE)"
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings ("
                    " model_id INTEGER NOT NULL REFERENCES models(id),"
                    " content TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL,"
                    " PRIMARY KEY (model_id, content)) WITHOUT ROWID"
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS file_keys ("
                    " path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                    " content TEXT NOT NULL) WITHOUT ROWID"
                )
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
        except sqlite3.DatabaseError as e:
            if _is_access_problem(e, self.path):
                raise ConfigError(
                    f"embedding cache {self.path} cannot be written ({e}): fix the permissions of the file "
                    "and its folder, choose another cache path, or run without the cache"
                ) from e
            raise ConfigError(
                f"embedding cache {self.path} is not a usable SQLite database ({e}); delete it or "
                "choose another cache path"
            ) from e
        self._check_schema(conn)

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise ConfigError(
                f"embedding cache {self.path} is not a comfy_nearid cache ({e}); delete it or choose "
                "another cache path"
            ) from e
        if row is None or row[0] != SCHEMA_VERSION:
            found = None if row is None else row[0]
            raise ConfigError(
                f"embedding cache {self.path} has schema version {found!r}; this version reads "
                f"{SCHEMA_VERSION!r}. Delete the file or choose another cache path"
            )

    def _model_id(self, identity: str, create: bool) -> int | None:
        if not isinstance(identity, str) or not identity:
            raise InvalidInputError(f"model identity must be a non-empty string, got {identity!r}")
        cached = self._model_ids.get(identity)
        if cached is not None:
            return cached
        conn = self._connection()
        try:
            row = conn.execute("SELECT id FROM models WHERE identity = ?", (identity,)).fetchone()
            if row is None and create:
                with conn:
                    conn.execute("INSERT OR IGNORE INTO models (identity) VALUES (?)", (identity,))
                row = conn.execute("SELECT id FROM models WHERE identity = ?", (identity,)).fetchone()
        except sqlite3.OperationalError as e:
            if self.readonly and "no such table" in str(e):
                return None
            raise
        if row is None:
            return None
        self._model_ids[identity] = int(row[0])
        return int(row[0])

    # ----------------------------------------------------------------- reads
    def get_many(self, model_identity: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors for the ``keys`` that have one: ``{key: float32 [D]}`` (misses left out)."""
        if self.readonly and not self.path.exists():
            return {}
        model_id = self._model_id(model_identity, create=False)
        if model_id is None or not keys:
            return {}
        conn = self._connection()
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _QUERY_CHUNK):
            chunk = unique[start : start + _QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT content, dim, vector FROM embeddings WHERE model_id = ? AND content IN ({marks})",
                (model_id, *chunk),
            ).fetchall()
            for content, dim, blob in rows:
                if len(blob) != 4 * dim:
                    # A damaged entry is a miss: recomputing it is always correct.
                    logger.warning("embedding cache %s: entry %s has %d bytes for dim %d; ignored",
                                   self.path, content, len(blob), dim)
                    continue
                found[content] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return found

    def get(self, model_identity: str, key: str) -> np.ndarray | None:
        """One cached vector (float32 ``[D]``) or ``None``."""
        return self.get_many(model_identity, [key]).get(key)

    # ----------------------------------------------------------------- writes
    def put_many(self, model_identity: str, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Store vectors (each a 1-D float array/tensor) in one transaction; returns how many were new.

        Existing entries are kept (first write wins), so two processes that computed the same
        embedding do not conflict.
        """
        if self.readonly:
            raise ConfigError(f"embedding cache {self.path} was opened read-only; cannot store entries")
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        if not pairs:
            return 0
        rows = []
        for key, vector in pairs:
            arr = _as_float32_vector(vector, key)
            rows.append((key, int(arr.shape[0]), arr.astype("<f4").tobytes()))
        model_id = self._model_id(model_identity, create=True)
        conn = self._connection()
        with conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO embeddings (model_id, content, dim, vector) VALUES (?, ?, ?, ?)",
                [(model_id, key, dim, blob) for key, dim, blob in rows],
            )
            return conn.total_changes - before

    def put(self, model_identity: str, key: str, vector: Any) -> bool:
        """Store one vector; ``True`` if it was new."""
        return self.put_many(model_identity, [(key, vector)]) == 1

    # ----------------------------------------------------------------- file -> pixel key memo
    def remembered_file_keys(self, files: Sequence[tuple[str, int, int]]) -> dict[str, str]:
        """The pixel content keys remembered for ``(path, size, mtime_ns)`` files: ``{path: key}``
        for the files whose path, size and mtime all match what was recorded."""
        if not files or (self.readonly and not self.path.exists()):
            return {}
        conn = self._connection()
        wanted = {path: (size, mtime) for path, size, mtime in files}
        found: dict[str, str] = {}
        paths = list(wanted)
        for start in range(0, len(paths), _QUERY_CHUNK):
            chunk = paths[start : start + _QUERY_CHUNK]
            try:
                rows = conn.execute(
                    f"SELECT path, size, mtime_ns, content FROM file_keys WHERE path IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            except sqlite3.OperationalError:  # a read-only cache made before the memo existed
                return {}
            for path, size, mtime, content in rows:
                if wanted[path] == (size, mtime):
                    found[path] = content
        return found

    def remember_file_keys(self, entries: Iterable[tuple[str, int, int, str]]) -> None:
        """Record ``(path, size, mtime_ns, pixel key)`` of decoded files (a no-op when read-only)."""
        entries = list(entries)
        if self.readonly or not entries:
            return
        conn = self._connection()
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO file_keys (path, size, mtime_ns, content) VALUES (?, ?, ?, ?)", entries
            )

    # ----------------------------------------------------------------- housekeeping
    def count(self, model_identity: str | None = None) -> int:
        """Number of entries, for one model identity or in total."""
        if self.readonly and not self.path.exists():
            return 0
        conn = self._connection()
        if model_identity is None:
            return int(conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])
        model_id = self._model_id(model_identity, create=False)
        if model_id is None:
            return 0
        return int(conn.execute("SELECT COUNT(*) FROM embeddings WHERE model_id = ?", (model_id,)).fetchone()[0])

    def model_identities(self) -> list[str]:
        """Every model identity that has a namespace in this file."""
        if self.readonly and not self.path.exists():
            return []
        return [r[0] for r in self._connection().execute("SELECT identity FROM models ORDER BY id")]

    def clear(self, model_identity: str | None = None) -> int:
        """Delete one model's entries (or all); returns how many were deleted."""
        if self.readonly:
            raise ConfigError(f"embedding cache {self.path} was opened read-only; cannot clear it")
        conn = self._connection()
        with conn:
            if model_identity is None:
                return conn.execute("DELETE FROM embeddings").rowcount
            model_id = self._model_id(model_identity, create=False)
            if model_id is None:
                return 0
            return conn.execute("DELETE FROM embeddings WHERE model_id = ?", (model_id,)).rowcount

    def close(self) -> None:
        """Close every connection this object opened (in any thread)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for _, pid, conn in connections:
            if pid == os.getpid():  # a forked child never closes its parent's handles
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}, readonly={self.readonly})"


def _is_access_problem(error: sqlite3.Error, path: Path) -> bool:
    """A permission / read-only problem (the file is fine; deleting it is the wrong advice)."""
    text = str(error).lower()
    if "readonly" in text or "read-only" in text or "unable to open" in text or "permission" in text:
        return True
    return path.exists() and not os.access(path, os.W_OK)


def _as_float32_vector(vector: Any, key: str) -> np.ndarray:
    if hasattr(vector, "detach"):  # torch tensor, without importing torch here
        vector = vector.detach().cpu().float().numpy()
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise InvalidInputError(f"embedding cache entry {key!r}: expected a 1-D vector, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"embedding cache entry {key!r}: vector holds NaN or infinite values")
    return arr


def file_stat_key(path: str | Path) -> tuple[str, int, int]:
    """``(absolute path, size, mtime_ns)``: what the file -> pixel key memo is keyed by.

    Raises:
        OSError: the file cannot be reached.
    """
    st = os.stat(path)
    return os.path.abspath(str(path)), int(st.st_size), int(st.st_mtime_ns)


def decoded_file_key(path: str | Path, cache: "EmbeddingCache | None" = None) -> tuple[str, np.ndarray | None]:
    """The content key of an image file, its decoded 8-bit RGB pixels' hash: ``(key, pixels)``.

    With a ``cache`` that remembers the file unchanged (same path, size and mtime) the file
    is not decoded (``pixels`` is None); otherwise it is decoded once, the key remembered.

    Raises:
        ImageLoadError: the file cannot be read or decoded.
    """
    from .errors import ImageLoadError
    from .images import load_image

    try:
        stat = file_stat_key(path)
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file ({e.strerror or e})") from e
    if cache is not None:
        known = cache.remembered_file_keys([stat]).get(stat[0])
        if known is not None:
            return known, None
    pixels = np.array(load_image(path), dtype=np.uint8)  # writable: torch warns on read-only arrays
    key = pixels_content_hash(pixels)
    if cache is not None:
        cache.remember_file_keys([(*stat, key)])
    return key, pixels


def image_cache_keys(
    images: Any, masks: Any = None, cache: "EmbeddingCache | None" = None
) -> tuple[list[Any], list[str], list[np.ndarray] | None]:
    """Split an image input into single images and their content keys.

    ``images`` is anything :meth:`IdentityModel.embed` takes (a path, PIL image, list of those,
    ``[B,3,H,W]`` / ``[B,H,W,C]`` tensor or array). Every image is keyed by its 8-bit RGB
    pixels, which is exactly what the model sees, so a file, its ComfyUI tensor and a float
    or uint8 copy share an entry (files through :func:`decoded_file_key`, with ``cache`` as
    its memo). Returns ``(items, keys, mask_arrays or None)``.
    """
    from PIL import Image

    from .images import as_mask_arrays, tensor_to_uint8

    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    items: list[Any] = []
    keys: list[str] = []
    if hasattr(images, "shape"):  # a batch tensor / array
        for arr in tensor_to_uint8(images):
            items.append(arr)
            keys.append(pixels_content_hash(arr))
    else:
        for i, item in enumerate(images):
            if isinstance(item, (str, Path)):
                key, pixels = decoded_file_key(item, cache)
                keys.append(key)
                items.append(item if pixels is None else pixels)  # decoded once at most
            elif isinstance(item, Image.Image):
                arr = np.array(item.convert("RGB"), dtype=np.uint8)  # writable: torch warns on read-only arrays
                items.append(arr)
                keys.append(pixels_content_hash(arr))
            elif hasattr(item, "shape"):
                for arr in tensor_to_uint8(item, name=f"images[{i}]"):
                    items.append(arr)
                    keys.append(pixels_content_hash(arr))
            else:
                raise InvalidInputError(
                    f"images[{i}]: unsupported type {type(item).__name__}; expected a path, PIL image, "
                    "numpy array or tensor"
                )
    if not items:
        raise InvalidInputError("images: no image given (empty list)")
    mask_arrays = None
    if masks is not None:
        mask_arrays = as_mask_arrays(masks, len(items))
        keys = [f"{k}|{mask_content_hash(m)}" for k, m in zip(keys, mask_arrays)]
    return items, keys, mask_arrays


def cached_embed(
    model: Any,
    images: Any,
    cache: EmbeddingCache | None,
    masks: Any = None,
    batch_size: int = 32,
) -> "torch.Tensor":
    """``model.embed(images, masks)`` through the cache: only misses reach the model.

    Args:
        model: an :class:`~comfy_nearid.model.IdentityModel` (uses ``.identity`` and ``.embed``).
        images: anything ``model.embed`` accepts (see :func:`image_cache_keys`).
        cache: the cache, or ``None`` to embed everything.
        masks: optional masks, one per image (or one for all), as ``model.embed`` takes them.
        batch_size: images per forward pass for the misses.

    Returns:
        float32 ``[N, D]`` L2-normalised embeddings on the CPU, in input order.
    """
    import torch

    if cache is None:
        return model.embed(images, masks=masks, batch_size=batch_size)
    items, keys, mask_arrays = image_cache_keys(images, masks, cache)
    identity = model_cache_identity(model)
    hits = cache.get_many(identity, keys)
    missing = [i for i, k in enumerate(keys) if k not in hits]
    computed: dict[str, np.ndarray] = {}
    if missing:
        miss_masks = None if mask_arrays is None else [mask_arrays[i] for i in missing]
        fresh = model.embed([items[i] for i in missing], masks=miss_masks, batch_size=batch_size)
        fresh_np = fresh.detach().cpu().float().numpy()
        computed = {keys[i]: fresh_np[j] for j, i in enumerate(missing)}
        cache.put_many(identity, computed)
    logger.debug("cached_embed: %d hits, %d computed", len(keys) - len(missing), len(missing))
    rows = [hits[k] if k in hits else computed[k] for k in keys]
    return torch.from_numpy(np.stack(rows).astype(np.float32))
