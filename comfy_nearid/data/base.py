"""Common reader behaviour: fixed order, ``len()``, indexing, iteration, split index files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DatasetError
from .sample import Sample


def parse_split_indices(value: Any, n_rows: int, origin: str) -> list[int]:
    """Validate a split selection: ``{"indices": [...]}`` or a plain list of row numbers.

    Every entry must be an integer in ``0 .. n_rows-1`` and appear once; the order is kept.
    ``origin`` names the file (or argument) in error messages.
    """
    if isinstance(value, dict):
        if "indices" not in value:
            raise DatasetError(
                f"index file {origin}: a JSON object must have an 'indices' key, found keys {sorted(value)}"
            )
        value = value["indices"]
    if not isinstance(value, (list, tuple)):
        raise DatasetError(
            f"index file {origin}: expected a list of row numbers or {{\"indices\": [...]}}, got {type(value).__name__}"
        )
    seen: dict[int, int] = {}
    out: list[int] = []
    for pos, idx in enumerate(value):
        # bool is an int subclass; True as a row number is a bug in the file, not row 1.
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise DatasetError(f"index file {origin}: entry {pos} is {idx!r}; row numbers must be integers")
        if not 0 <= idx < n_rows:
            raise DatasetError(
                f"index file {origin}: entry {pos} is {idx}, out of range for a dataset of {n_rows} rows "
                f"(allowed 0..{n_rows - 1})"
            )
        if idx in seen:
            raise DatasetError(f"index file {origin}: row {idx} appears twice (entries {seen[idx]} and {pos})")
        seen[idx] = pos
        out.append(idx)
    return out


def load_split_indices(source: str | Path | Sequence[int], n_rows: int) -> list[int]:
    """Read a split file (JSON ``{"indices": [...]}`` or a JSON list) or take a list as is.

    Raises :class:`DatasetError` for a missing/unparsable file, duplicates or out-of-range rows.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        from ..fileio import read_json

        if not path.exists():
            raise DatasetError(f"index file {path} does not exist")
        value = read_json(path, "index file")
        return parse_split_indices(value, n_rows, str(path))
    return parse_split_indices(list(source), n_rows, "<indices argument>")


class NearIDDataset(ABC):
    """A fixed-order, lazily read sequence of :class:`Sample`.

    Subclasses implement ``_num_rows`` and ``_read_row(row)``; ``indices`` (an optional
    selection of rows, e.g. a split file) maps dataset positions to rows.
    """

    def __init__(self, indices: str | Path | Sequence[int] | None = None) -> None:
        self._indices: list[int] | None = None if indices is None else load_split_indices(indices, self._num_rows())

    @abstractmethod
    def _num_rows(self) -> int:
        """Number of rows before any index selection."""

    @abstractmethod
    def _read_row(self, row: int) -> Sample:
        """Build the sample of one row (no image decoding)."""

    @abstractmethod
    def describe(self) -> str:
        """Short human-readable description (paths) for logs and reports."""

    def __len__(self) -> int:
        return self._num_rows() if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> Sample:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"dataset indices must be integers, got {type(index).__name__}")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample index {index} out of range for {self.describe()} with {n} samples")
        row = index if self._indices is None else self._indices[index]
        return self._read_row(row)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()}, {len(self)} samples)"
