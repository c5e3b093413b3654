"""Row access to Hugging Face datasets on disk, without loading them into memory.

Two on-disk forms are read with pyarrow only (the ``datasets`` package is not needed):

- ``Dataset.save_to_disk`` folders (``state.json`` + ``data-*.arrow`` IPC stream files, memory
  mapped) and ``DatasetDict`` folders (``dataset_dict.json`` + one such folder per split);
- folders of parquet shards as the hub stores them (``data/train-00000-of-00004.parquet``),
  or a single parquet file; rows are read one row group at a time and the last group read is
  cached, so sequential iteration decodes each group once and memory stays bounded.

Image cells are Hugging Face ``Image`` structs ``{"bytes": ..., "path": ...}``, raw bytes, or
a path string; :func:`image_cell_ref` turns one into an :class:`ImageRef`.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import Any, Sequence

from ..errors import DatasetError
from .sample import BytesImageRef, FileImageRef, ImageMode, ImageRef

logger = logging.getLogger(__name__)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401  (registers pa.ipc)
        import pyarrow.parquet as pq
    except ImportError as e:  # optional dependency: only the published readers need it
        raise DatasetError(
            "reading Hugging Face / parquet datasets needs pyarrow: pip install 'comfy-nearid[data]'"
        ) from e
    return pa, pq


class ArrowTable:
    """Read-only row access to one on-disk table made of several files (shards).

    ``name`` is used in error messages. ``num_rows`` and ``column_names`` come from file
    metadata; ``rows(row, columns)`` returns a dict for one row.
    """

    def __init__(self, path: str | Path, split: str | None = None, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or str(self.path)
        if not self.path.exists():
            raise DatasetError(f"dataset {self.name}: {self.path} does not exist")
        self._pa, self._pq = _pyarrow()
        self._ipc_tables: dict[int, Any] = {}
        self._kind, self._files = self._discover(split)
        self._chunks: list[tuple[int, int, int]] = []  # (file index, row group or -1, first row)
        self._starts: list[int] = []  # first row of each chunk, for bisection
        self._schema_names: list[str] | None = None
        self._num_rows = 0
        self._scan_metadata()
        self._cache_key: tuple[int, int, tuple[str, ...]] | None = None
        self._cache_rows: Any = None  # rows of the last row group read (a list, or an mmapped arrow table)

    # ----------------------------------------------------------------- discovery
    def _discover(self, split: str | None) -> tuple[str, list[Path]]:
        p = self.path
        if p.is_file():
            if p.suffix != ".parquet":
                raise DatasetError(f"dataset {self.name}: {p} is a file but not a .parquet file")
            return "parquet", [p]
        if (p / "dataset_dict.json").is_file():
            splits = self._read_json(p / "dataset_dict.json").get("splits", [])
            if split is None:
                if len(splits) != 1:
                    raise DatasetError(
                        f"dataset {self.name}: {p} is a DatasetDict with splits {splits}; choose one with split=..."
                    )
                split = splits[0]
            if split not in splits:
                raise DatasetError(f"dataset {self.name}: split {split!r} not in {p} (splits: {splits})")
            self.path = p = p / split
        if (p / "state.json").is_file():
            state = self._read_json(p / "state.json")
            files = [p / f["filename"] for f in state.get("_data_files", [])]
            missing = [str(f) for f in files if not f.is_file()]
            if not files or missing:
                raise DatasetError(f"dataset {self.name}: {p}/state.json lists missing arrow files {missing or '(none)'}")
            return "arrow", files
        shards = sorted(p.rglob("*.parquet"))
        if split is not None:
            shards = [s for s in shards if split in s.relative_to(p).parts[:-1] or s.name.startswith(f"{split}-")]
        if not shards:
            raise DatasetError(
                f"dataset {self.name}: {p} is neither a save_to_disk folder (state.json), a DatasetDict "
                f"(dataset_dict.json) nor a folder of .parquet shards"
                + (f" for split {split!r}" if split else "")
            )
        return "parquet", shards

    def _read_json(self, path: Path) -> dict[str, Any]:
        from ..fileio import read_json

        value = read_json(path, f"dataset {self.name}:")
        if not isinstance(value, dict):
            raise DatasetError(f"dataset {self.name}: {path} must hold a JSON object")
        return value

    def _scan_metadata(self) -> None:
        for fi, f in enumerate(self._files):
            try:
                if self._kind == "parquet":
                    meta = self._pq.read_metadata(f)
                    names = list(meta.schema.to_arrow_schema().names)
                    for rg in range(meta.num_row_groups):
                        self._chunks.append((fi, rg, self._num_rows))
                        self._num_rows += meta.row_group(rg).num_rows
                else:
                    table = self._ipc_table(fi)
                    names = list(table.schema.names)
                    self._chunks.append((fi, -1, self._num_rows))
                    self._num_rows += table.num_rows
            except (OSError, self._pa.ArrowException) as e:
                raise DatasetError(f"dataset {self.name}: cannot read {f}: {e}") from e
            if self._schema_names is None:
                self._schema_names = names
            elif names != self._schema_names:
                raise DatasetError(
                    f"dataset {self.name}: shard {f} has columns {names}, unlike the first shard's {self._schema_names}"
                )

    def _ipc_table(self, fi: int) -> Any:
        # Memory-mapped: the table's buffers point into the file, nothing is copied until a row is read.
        if fi not in self._ipc_tables:
            source = self._pa.memory_map(str(self._files[fi]), "r")
            self._ipc_tables[fi] = self._pa.ipc.open_stream(source).read_all()
        return self._ipc_tables[fi]

    # ----------------------------------------------------------------- access
    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def base_dir(self) -> Path:
        """Folder that relative image paths in cells are resolved against."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def column_names(self) -> list[str]:
        return list(self._schema_names or [])

    def _chunk_of(self, row: int) -> tuple[int, int, int]:
        if len(self._starts) != len(self._chunks):
            self._starts = [c[2] for c in self._chunks]
        return self._chunks[bisect.bisect_right(self._starts, row) - 1]

    def _load_chunk(self, fi: int, rg: int, columns: tuple[str, ...]) -> Any:
        try:
            if self._kind == "parquet":
                return self._pq.ParquetFile(self._files[fi]).read_row_group(rg, columns=list(columns)).to_pylist()
            # arrow files are memory mapped: keep the table and slice rows out one at a time
            return self._ipc_table(fi).select(list(columns))
        except (OSError, self._pa.ArrowException) as e:
            raise DatasetError(f"dataset {self.name}: cannot read {self._files[fi]}: {e}") from e

    def row(self, row: int, columns: Sequence[str]) -> dict[str, Any]:
        """One row as ``{column: python value}`` (images as ``{"bytes", "path"}`` dicts)."""
        if not 0 <= row < self._num_rows:
            raise DatasetError(f"dataset {self.name}: row {row} out of range (0..{self._num_rows - 1})")
        fi, rg, start = self._chunk_of(row)
        key = (fi, rg, tuple(columns))
        if key != self._cache_key:
            self._cache_rows = self._load_chunk(fi, rg, tuple(columns))
            self._cache_key = key
        if self._kind == "arrow":
            return self._cache_rows.slice(row - start, 1).to_pylist()[0]
        return self._cache_rows[row - start]

    def column(self, name: str) -> list[Any]:
        """A whole (small) column, e.g. ``id``, read shard by shard."""
        out: list[Any] = []
        for fi, f in enumerate(self._files):
            try:
                if self._kind == "parquet":
                    # ParquetFile.read, not pq.read_table: the latter pre-buffers large ranges of
                    # the (image) column chunks around the one column asked for.
                    out.extend(self._pq.ParquetFile(f).read(columns=[name]).column(name).to_pylist())
                else:
                    out.extend(self._ipc_table(fi).column(name).to_pylist())
            except (OSError, self._pa.ArrowException) as e:
                raise DatasetError(f"dataset {self.name}: cannot read column {name!r} of {f}: {e}") from e
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for DataLoader workers: drop module handles, caches and memory maps.
        state = self.__dict__.copy()
        state.update(_pa=None, _pq=None, _cache_key=None, _cache_rows=None, _ipc_tables={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pa, self._pq = _pyarrow()


def check_columns(table: ArrowTable, required: Sequence[str], optional: Sequence[str], role: str) -> None:
    """Refuse a table lacking required columns, naming what it has and what is expected."""
    have = table.column_names
    missing = [c for c in required if c not in have]
    if missing:
        raise DatasetError(
            f"{role} dataset {table.name} does not have the expected columns: missing {missing}; "
            f"found columns {have}; expected {list(required)}"
            + (f" (optional: {list(optional)})" if optional else "")
        )


def image_cell_ref(value: Any, origin: str, base_dir: Path, mode: ImageMode = "RGB") -> ImageRef | None:
    """Turn a table cell into an ImageRef (None for an empty cell).

    Accepts a Hugging Face Image struct ``{"bytes": b, "path": p}`` (bytes preferred, else the
    file ``p`` resolved against ``base_dir``), raw bytes, or a path string.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return BytesImageRef(data, origin, mode=mode, path=path)
        if path:
            return FileImageRef(Path(path) if Path(path).is_absolute() else base_dir / path, mode=mode)
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return BytesImageRef(bytes(value), origin, mode=mode) if len(value) else None
    if isinstance(value, str):
        return FileImageRef(Path(value) if Path(value).is_absolute() else base_dir / value, mode=mode) if value else None
    raise DatasetError(
        f"{origin}: unsupported image cell of type {type(value).__name__}; expected an Image struct "
        "{'bytes', 'path'}, bytes or a path string"
    )
