"""The per-sample similarity table and its CSV form (the reference implementation's format).

One row per (sample, distractor source). Columns of the CSV:

- ``id`` (required), ``category`` (optional), ``source`` (optional, distractor source);
- ``sim_01``, ``sim_02``, ``sim_12``: view-view similarities;
- ``cross_ij``: view ``i`` vs distractor ``j`` (``i, j`` in 0..2); the margins use ``cross_ii``;
- ``neg_sim_01``, ``neg_sim_02``, ``neg_sim_12`` (optional): distractor-distractor;
- ``oracle_0..2`` (optional, MTG): ``1 - part_area / object_area`` of edited image ``i``;
- derived columns this package writes and re-checks on reading: ``margin_a_b``
  (``s(p_a, p_b) - s(p_a, d_a)``), ``n_trials``, ``n_wins``, ``success``.

Missing cells are empty. ``id``, ``sim_01``, ``cross_00`` and ``cross_11`` must be present.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DatasetError, InvalidInputError
from ..fileio import parse_number, read_text
from .ssr import MARGIN_SLOTS, margins_from_similarities, sample_outcomes

__all__ = [
    "N_VIEWS",
    "SimilarityTable",
    "read_similarity_csv",
    "write_similarity_csv",
]

logger = logging.getLogger(__name__)

N_VIEWS = 3
_PAIRS = ((0, 1), (0, 2), (1, 2))
SIM_COLUMNS = tuple(f"sim_{i}{j}" for i, j in _PAIRS)
CROSS_COLUMNS = tuple(f"cross_{i}{j}" for i in range(N_VIEWS) for j in range(N_VIEWS))
NEG_COLUMNS = tuple(f"neg_sim_{i}{j}" for i, j in _PAIRS)
ORACLE_COLUMNS = tuple(f"oracle_{i}" for i in range(N_VIEWS))
MARGIN_COLUMNS = tuple(f"margin_{a}_{b}" for a, b in MARGIN_SLOTS)
COUNT_COLUMNS = ("n_trials", "n_wins", "success")
TEXT_COLUMNS = ("id", "category", "source")
REQUIRED_COLUMNS = ("id", "sim_01", "cross_00", "cross_11")
KNOWN_COLUMNS = TEXT_COLUMNS + SIM_COLUMNS + CROSS_COLUMNS + NEG_COLUMNS + ORACLE_COLUMNS + MARGIN_COLUMNS + COUNT_COLUMNS
DEFAULT_CATEGORY = "all"
DEFAULT_SOURCE = "all"


def _nan_block(rows: int, *shape: int) -> np.ndarray:
    return np.full((rows, *shape), np.nan, dtype=np.float64)


@dataclass
class SimilarityTable:
    """Similarities of every sample of one scorer (``R`` rows = samples x distractor sources).

    Attributes:
        ids: ``R`` sample ids.
        categories: ``R`` category labels.
        sources: ``R`` distractor-source labels.
        view_sims: ``[R, 3, 3]`` float64, symmetric, ``[i, j] = s(p_i, p_j)``; NaN = missing.
        cross_sims: ``[R, 3, 3]`` float64, ``[i, j] = s(p_i, d_j)``.
        distractor_sims: ``[R, 3, 3]`` float64, symmetric ``s(d_i, d_j)``; NaN if not computed.
        oracle: ``[R, 3]`` float64 MTG oracle of edited image ``i``; NaN outside MTG.
        images: optional ``R`` dicts ``{"views": [ref|None]*3, "distractors": [ref|None]*3}``
            (``ImageRef``s of the model path, used by the report's failure gallery).
        info: provenance counts (e.g. ``n_images_embedded``, ``n_image_slots``).
    """

    ids: list[str]
    categories: list[str]
    sources: list[str]
    view_sims: np.ndarray
    cross_sims: np.ndarray
    distractor_sims: np.ndarray | None = None
    oracle: np.ndarray | None = None
    images: list[dict[str, list[Any]]] | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = len(self.ids)
        if len(self.categories) != rows or len(self.sources) != rows:
            raise InvalidInputError(
                f"ids ({rows}), categories ({len(self.categories)}) and sources ({len(self.sources)}) differ in length"
            )
        self.view_sims = np.asarray(self.view_sims, dtype=np.float64)
        self.cross_sims = np.asarray(self.cross_sims, dtype=np.float64)
        self.distractor_sims = (
            _nan_block(rows, N_VIEWS, N_VIEWS) if self.distractor_sims is None
            else np.asarray(self.distractor_sims, dtype=np.float64)
        )
        self.oracle = _nan_block(rows, N_VIEWS) if self.oracle is None else np.asarray(self.oracle, dtype=np.float64)
        for name, arr, shape in (
            ("view_sims", self.view_sims, (rows, N_VIEWS, N_VIEWS)),
            ("cross_sims", self.cross_sims, (rows, N_VIEWS, N_VIEWS)),
            ("distractor_sims", self.distractor_sims, (rows, N_VIEWS, N_VIEWS)),
            ("oracle", self.oracle, (rows, N_VIEWS)),
        ):
            if arr.shape != shape:
                raise InvalidInputError(f"{name} must have shape {shape}, got {arr.shape}")
        if self.images is not None and len(self.images) != rows:
            raise InvalidInputError(f"images has {len(self.images)} entries for {rows} rows")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty_arrays(cls, rows: int) -> dict[str, np.ndarray]:
        """NaN-filled arrays of the right shapes for ``rows`` rows (for builders)."""
        return {
            "view_sims": _nan_block(rows, N_VIEWS, N_VIEWS),
            "cross_sims": _nan_block(rows, N_VIEWS, N_VIEWS),
            "distractor_sims": _nan_block(rows, N_VIEWS, N_VIEWS),
            "oracle": _nan_block(rows, N_VIEWS),
        }

    def own_distractor_sims(self) -> np.ndarray:
        """``[R, 3]``: ``s(p_i, d_i)``, the diagonal of ``cross_sims``."""
        return np.diagonal(self.cross_sims, axis1=1, axis2=2).copy()

    def margins(self) -> np.ndarray:
        """``[R, 6]`` margins in :data:`MARGIN_SLOTS` order (NaN = not a trial)."""
        return margins_from_similarities(self.view_sims, self.own_distractor_sims())

    def select(self, rows: np.ndarray | Sequence[int]) -> "SimilarityTable":
        """A new table with the given rows (bool mask or indices), in that order."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        return SimilarityTable(
            ids=[self.ids[i] for i in idx],
            categories=[self.categories[i] for i in idx],
            sources=[self.sources[i] for i in idx],
            view_sims=self.view_sims[idx],
            cross_sims=self.cross_sims[idx],
            distractor_sims=self.distractor_sims[idx],
            oracle=self.oracle[idx],
            images=None if self.images is None else [self.images[i] for i in idx],
        )

    def rows(self) -> list[dict[str, Any]]:
        """Per-row dicts with every CSV column (NaN cells as ``None``)."""
        margins = self.margins()
        outcomes = sample_outcomes(margins)
        out: list[dict[str, Any]] = []
        for r in range(len(self)):
            row: dict[str, Any] = {"id": self.ids[r], "category": self.categories[r], "source": self.sources[r]}
            for (i, j), col in zip(_PAIRS, SIM_COLUMNS):
                row[col] = _none_if_nan(self.view_sims[r, i, j])
            for col in CROSS_COLUMNS:
                row[col] = _none_if_nan(self.cross_sims[r, int(col[-2]), int(col[-1])])
            for (i, j), col in zip(_PAIRS, NEG_COLUMNS):
                row[col] = _none_if_nan(self.distractor_sims[r, i, j])
            for i, col in enumerate(ORACLE_COLUMNS):
                row[col] = _none_if_nan(self.oracle[r, i])
            for k, col in enumerate(MARGIN_COLUMNS):
                row[col] = _none_if_nan(margins[r, k])
            row["n_trials"] = int(outcomes.n_trials[r])
            row["n_wins"] = int(outcomes.n_wins[r])
            row["success"] = int(outcomes.success[r]) if outcomes.n_trials[r] else None
            out.append(row)
        return out


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest exact round-trip form
    return str(value)


def write_similarity_csv(path: str | Path, table: SimilarityTable) -> Path:
    """Write ``table`` (similarities, margins, counts) in the reference CSV format.

    ``neg_sim_*`` and ``oracle_*`` columns are written only when some row has a value.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(TEXT_COLUMNS + SIM_COLUMNS + CROSS_COLUMNS)
    if np.isfinite(table.distractor_sims).any():
        columns += NEG_COLUMNS
    if np.isfinite(table.oracle).any():
        columns += ORACLE_COLUMNS
    columns += MARGIN_COLUMNS + COUNT_COLUMNS
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in table.rows():
            writer.writerow([_format_cell(row[c]) for c in columns])
    tmp.replace(path)
    return path


def _parse_number(cell: str, path: Path, line: int, column: str) -> float:
    text = cell.strip()
    if text == "" or text.lower() == "nan":
        return math.nan
    try:
        value = parse_number(text)
    except ValueError as e:
        raise DatasetError(
            f"{path}: line {line}, column {column!r}: {cell!r} is not a number (allowed: a number or an empty cell)"
        ) from e
    if math.isinf(value):
        raise DatasetError(f"{path}: line {line}, column {column!r}: {cell!r} is infinite (allowed: a finite number or an empty cell)")
    return value


def _check_header(header: list[str], path: Path) -> list[str]:
    columns = [c.strip() for c in header]
    seen: set[str] = set()
    for col in columns:
        if col in seen:
            raise DatasetError(f"{path}: line 1: column {col!r} appears twice")
        seen.add(col)
    unknown = [c for c in columns if c not in KNOWN_COLUMNS]
    if unknown:
        raise DatasetError(
            f"{path}: line 1: unknown column(s) {unknown}; allowed: id, category, source, "
            f"{', '.join(SIM_COLUMNS)}, cross_ij (i, j in 0..2), {', '.join(NEG_COLUMNS)}, "
            f"{', '.join(ORACLE_COLUMNS)}, margin_a_b, n_trials, n_wins, success"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        raise DatasetError(f"{path}: line 1: missing required column(s) {missing} (required: {list(REQUIRED_COLUMNS)})")
    return columns


def read_similarity_csv(path: str | Path, default_source: str = DEFAULT_SOURCE) -> SimilarityTable:
    """Read a per-sample similarity CSV (reference format, see the module docstring).

    Args:
        path: the CSV file.
        default_source: source label of every row when the file has no ``source`` column.

    Raises:
        DatasetError: unknown/missing/duplicate columns, a row with the wrong number of cells,
            a non-numeric cell, an empty id, a duplicate id (per source), derived columns that
            disagree with the similarities, or no rows; each message names line and column.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path, "similarity CSV"), newline=""))
    try:
        try:
            header = next(reader)
        except StopIteration as e:
            raise DatasetError(f"{path}: empty file (expected a header line with {list(REQUIRED_COLUMNS)})") from e
        columns = _check_header(header, path)
        records = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except csv.Error as e:  # e.g. a cell over the csv module's field size limit (128 KiB)
        raise DatasetError(
            f"{path}: line {reader.line_num}: not a readable CSV line ({e}); a similarity CSV holds short "
            "ids and numbers"
        ) from e
    if not records:
        raise DatasetError(f"{path}: no data rows after the header")
    table_arrays = SimilarityTable.empty_arrays(len(records))
    ids: list[str] = []
    categories: list[str] = []
    sources: list[str] = []
    derived: dict[str, np.ndarray] = {c: np.full(len(records), np.nan) for c in columns if c in MARGIN_COLUMNS + COUNT_COLUMNS}
    first_line: dict[tuple[str, str], int] = {}
    for r, (line, cells) in enumerate(records):
        if len(cells) != len(columns):
            raise DatasetError(f"{path}: line {line} has {len(cells)} cells, the header has {len(columns)}")
        values = dict(zip(columns, cells))
        sample_id = values["id"].strip()
        if not sample_id:
            raise DatasetError(f"{path}: line {line}, column 'id': empty id")
        source = values.get("source", default_source).strip() or default_source
        key = (sample_id, source)
        if key in first_line:
            raise DatasetError(
                f"{path}: line {line}, column 'id': duplicate id {sample_id!r}"
                + (f" for source {source!r}" if "source" in values else "")
                + f" (first on line {first_line[key]})"
            )
        first_line[key] = line
        ids.append(sample_id)
        sources.append(source)
        categories.append(values.get("category", "").strip() or DEFAULT_CATEGORY)
        for col, cell in values.items():
            if col in TEXT_COLUMNS:
                continue
            value = _parse_number(cell, path, line, col)
            if col in derived:
                derived[col][r] = value
            elif col.startswith("sim_"):
                i, j = int(col[-2]), int(col[-1])
                table_arrays["view_sims"][r, i, j] = table_arrays["view_sims"][r, j, i] = value
            elif col.startswith("cross_"):
                table_arrays["cross_sims"][r, int(col[-2]), int(col[-1])] = value
            elif col.startswith("neg_sim_"):
                i, j = int(col[-2]), int(col[-1])
                table_arrays["distractor_sims"][r, i, j] = table_arrays["distractor_sims"][r, j, i] = value
            elif col.startswith("oracle_"):
                table_arrays["oracle"][r, int(col[-1])] = value
    table = SimilarityTable(ids=ids, categories=categories, sources=sources, **table_arrays)
    _check_derived(table, derived, path, [line for line, _ in records])
    return table


def _check_derived(table: SimilarityTable, derived: dict[str, np.ndarray], path: Path, lines: list[int]) -> None:
    """Refuse derived columns (margins, counts) that disagree with the similarities."""
    if not derived:
        return
    margins = table.margins()
    outcomes = sample_outcomes(margins)
    expected: dict[str, np.ndarray] = {col: margins[:, k] for k, col in enumerate(MARGIN_COLUMNS)}
    expected["n_trials"] = outcomes.n_trials.astype(np.float64)
    expected["n_wins"] = outcomes.n_wins.astype(np.float64)
    expected["success"] = np.where(outcomes.counted, outcomes.success.astype(np.float64), np.nan)
    for col, given in derived.items():
        want = expected[col]
        same = np.isclose(given, want, rtol=1e-9, atol=1e-12, equal_nan=True)
        if not same.all():
            r = int(np.flatnonzero(~same)[0])
            raise DatasetError(
                f"{path}: line {lines[r]}, column {col!r}: {given[r]!r} disagrees with the value "
                f"recomputed from the similarities ({want[r]!r}); fix or drop the derived column"
            )
