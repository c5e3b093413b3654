"""Score rows: one row per (subject, image); CSV/JSONL encoding, reading and appending."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..errors import DatasetError, InvalidInputError

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("csv", "jsonl")
ROW_FIELDS = ("path", "subject", "cosines", "score", "match", "calibrated", "rank", "error")
# Columns of a rows file, in this order:
# 1. ROW_FIELDS;
# 2. label columns: a mapping file's extra columns (``checkpoint``, ``method``, ...), named as
#    in the mapping; a name starts with a letter or ``_``, holds letters, digits, ``_ . -``
#    and is none of ROW_FIELDS (see check_label_columns), so it never clashes with a score column;
# 3. a run with several scorers (``nearid score --scorer A --scorer B``) adds one column per
#    further scorer: "score:<name>" (its reference-combined cosine); ``score``, ``match``,
#    ``calibrated`` and ``rank`` stay the first scorer's, so single-scorer readers are unaffected.
SCORE_COLUMN_PREFIX = "score:"
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_COSINE_SEPARATOR = ";"
# ============================================================================ rows
@dataclass
class ScoreRow:
    """One output row. ``score`` combines the references (mean or max of the cosines, or the
    cosine to the prototype; see :func:`combine_references`),
    ``match`` its 0..100 identity match, ``calibrated`` whether that match comes from a curve
    fitted for this head (False: the uncalibrated default curve), ``rank`` 1 = best within the subject (filled in
    when the run completes); error rows carry ``error`` and no numbers. ``labels``: the mapping
    file's extra columns for this image (``{"checkpoint": "ckpt-100"}``), ``scorer_scores``:
    the further scorers' ``score:<name>`` columns."""

    path: str
    subject: str
    cosines: tuple[float, ...] = ()
    score: float | None = None
    match: float | None = None
    calibrated: bool | None = None
    rank: int | None = None
    error: str | None = None
    scorer_scores: dict[str, float | None] = field(default_factory=dict)  # further scorers, by name
    labels: dict[str, str] = field(default_factory=dict)  # mapping file columns, by name

    def to_record(self, fields: Sequence[str] | None = None) -> dict[str, Any]:
        """The row as a JSON-ready dict with ``fields`` (default: every column it has)."""
        rec = {
            "path": self.path, "subject": self.subject, "cosines": list(self.cosines), "score": self.score,
            "match": self.match, "calibrated": self.calibrated, "rank": self.rank, "error": self.error,
        }
        if fields is None:
            fields = row_fields(tuple(self.labels), tuple(self.scorer_scores))
        for name in fields[len(ROW_FIELDS):]:
            if name.startswith(SCORE_COLUMN_PREFIX):
                rec[name] = self.scorer_scores.get(name[len(SCORE_COLUMN_PREFIX):])
            else:
                rec[name] = self.labels.get(name, "")
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any], where: str) -> "ScoreRow":
        try:
            return cls(
                path=str(rec["path"]), subject=str(rec["subject"]),
                cosines=tuple(float(c) for c in rec.get("cosines") or ()),
                score=None if rec.get("score") is None else float(rec["score"]),
                match=None if rec.get("match") is None else float(rec["match"]),
                calibrated=_parse_flag(rec.get("calibrated")),
                rank=None if rec.get("rank") is None else int(rec["rank"]),
                error=rec.get("error") or None,
                scorer_scores={
                    key[len(SCORE_COLUMN_PREFIX):]: None if value in (None, "") else float(value)
                    for key, value in rec.items() if key.startswith(SCORE_COLUMN_PREFIX)
                },
                labels={key: "" if value is None else str(value) for key, value in rec.items()
                        if key not in ROW_FIELDS and not key.startswith(SCORE_COLUMN_PREFIX)},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{where}: not a score row ({e}); expected fields {list(ROW_FIELDS)}") from e


def _parse_flag(value: Any) -> bool | None:
    """``calibrated`` as written in JSONL (true/false) or CSV (``true``/``false``/empty)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"calibrated must be true or false, got {value!r}")


def short_float(x: float) -> float:
    """The shortest decimal that round-trips the value's float32: rows stay readable and two
    runs that computed the same float32 write the same text."""
    return float(str(np.float32(x)))


def _csv_line(values: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


CSV_HEADER = _csv_line(ROW_FIELDS)


def check_label_columns(names: Sequence[str], where: str) -> None:
    """Refuse label column names that are not usable as rows columns (see the column layout above).

    Raises:
        DatasetError: a name clashes with a score column (one of ROW_FIELDS or ``score:...``) or
            is not a plain name; the message names the column and ``where`` (the mapping file).
    """
    for name in names:
        if name in ROW_FIELDS or name.startswith(SCORE_COLUMN_PREFIX):
            raise DatasetError(
                f"{where}: column {name!r} clashes with a column of the score rows ({', '.join(ROW_FIELDS)}, "
                f"{SCORE_COLUMN_PREFIX}<scorer>); rename it (e.g. {'source_' + name.replace(':', '_')!r})"
            )
        if not _LABEL_NAME.fullmatch(name):
            raise DatasetError(
                f"{where}: column {name!r} cannot become a rows column; a column name starts with a letter or _ "
                "and holds only letters, digits and _ . -"
            )


def row_fields(label_names: Sequence[str] = (), scorer_names: Sequence[str] = ()) -> tuple[str, ...]:
    """The columns of a rows file: ROW_FIELDS, the label columns, ``score:<name>`` per further scorer."""
    return (*ROW_FIELDS, *label_names, *(SCORE_COLUMN_PREFIX + name for name in scorer_names))


def csv_header(fields: Sequence[str] = ROW_FIELDS) -> str:
    """The CSV header line of a rows file with these columns (see :func:`row_fields`)."""
    return _csv_line(fields)


def label_columns(fields: Sequence[str]) -> tuple[str, ...]:
    """The label columns among a rows file's columns."""
    return tuple(f for f in fields[len(ROW_FIELDS):] if not f.startswith(SCORE_COLUMN_PREFIX))


def encode_row(row: ScoreRow, fmt: str, fields: Sequence[str] = ROW_FIELDS) -> str:
    """One row as one line of CSV or JSONL (ending in a newline) with the columns ``fields``
    (see :func:`row_fields`; a label or score column the row has no value for is written empty)."""
    if fmt == "jsonl":
        return json.dumps(row.to_record(fields), ensure_ascii=False) + "\n"
    num = lambda v: "" if v is None else repr(v)  # noqa: E731
    extra = [num(row.scorer_scores.get(f[len(SCORE_COLUMN_PREFIX):])) if f.startswith(SCORE_COLUMN_PREFIX)
             else row.labels.get(f, "") for f in fields[len(ROW_FIELDS):]]
    return _csv_line([
        row.path, row.subject, _COSINE_SEPARATOR.join(repr(c) for c in row.cosines), num(row.score),
        num(row.match), "" if row.calibrated is None else str(row.calibrated).lower(),
        "" if row.rank is None else str(row.rank), row.error or "", *extra,
    ])


def decode_row(line: str, fmt: str, where: str, fields: Sequence[str] = ROW_FIELDS) -> ScoreRow:
    """Parse one line written by :func:`encode_row`; ``fields``: the CSV header's columns."""
    if fmt == "jsonl":
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {rec!r}")
        return ScoreRow.from_record(rec, where)
    values = next(csv.reader([line]))
    if len(values) != len(fields):
        raise DatasetError(f"{where}: expected {len(fields)} CSV fields {list(fields)}, got {len(values)}")
    rec = dict(zip(fields, values))
    rec["cosines"] = [c for c in rec["cosines"].split(_COSINE_SEPARATOR) if c]
    for name in ("score", "match", "calibrated", "rank"):
        rec[name] = rec[name] or None
    return ScoreRow.from_record(rec, where)


def scan_rows(path: Path, fmt: str) -> Iterator[tuple[int, ScoreRow]]:
    """``(byte offset, row)`` for every complete line of a row file; a trailing line without
    its newline (the write a crash interrupted) is ignored."""
    with open(path, "rb") as f:
        offset = 0
        line_no = 0
        fields: Sequence[str] = ROW_FIELDS
        if fmt == "csv":
            header = f.readline()
            line_no = 1
            if header and header.endswith(b"\n"):
                fields = _header_fields(header.decode("utf-8", "replace"), path)
            offset = len(header)
        for raw in iter(f.readline, b""):
            line_no += 1
            if not raw.endswith(b"\n"):
                break
            if raw.strip():
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(
                        f"{path}, line {line_no}: not UTF-8 text; it was not written by `nearid score` "
                        "(use --overwrite or another output)"
                    ) from e
                yield offset, decode_row(text, fmt, f"{path}, line {line_no}", fields)
            offset += len(raw)


def _header_fields(header: str, path: Path) -> tuple[str, ...]:
    """The columns of a CSV rows header: ROW_FIELDS, label columns, then ``score:<name>`` columns."""
    fields = tuple(next(csv.reader([header])))
    extra = fields[len(ROW_FIELDS):]
    labels = label_columns(fields)
    scores = extra[len(labels):]
    if (fields[: len(ROW_FIELDS)] != ROW_FIELDS or len(set(fields)) != len(fields)
            or not all(_LABEL_NAME.fullmatch(f) for f in labels)
            or not all(f.startswith(SCORE_COLUMN_PREFIX) and len(f) > len(SCORE_COLUMN_PREFIX) for f in scores)):
        raise DatasetError(
            f"{path}: header is {header.strip()!r}, expected {CSV_HEADER.strip()!r} (optionally followed by "
            f"label columns and {SCORE_COLUMN_PREFIX}<name> columns); it was not written by `nearid score`"
        )
    return fields


def file_fields(path: Path, fmt: str) -> tuple[str, ...]:
    """The columns of a CSV rows file (from its header; ROW_FIELDS for JSONL or no header)."""
    if fmt != "csv":
        return ROW_FIELDS
    with open(path, "rb") as f:
        header = f.readline()
    return _header_fields(header.decode("utf-8", "replace"), path) if header.endswith(b"\n") else ROW_FIELDS


def read_rows(path: str | Path, fmt: str | None = None) -> list[ScoreRow]:
    """All rows of a CSV/JSONL row file written by :func:`score_plan` (format from the suffix)."""
    path = Path(path)
    return [row for _, row in scan_rows(path, fmt or format_from_suffix(path))]


def format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in OUTPUT_FORMATS:
        return suffix
    raise InvalidInputError(f"output {path}: cannot tell the format from {path.suffix!r}; use .csv or .jsonl")


def open_for_append(path: Path, fmt: str, fields: Sequence[str] = ROW_FIELDS) -> io.TextIOWrapper:
    """Open a row file to append: drop a crash's partial last line, write the CSV header
    (``fields``, see :func:`row_fields`) if new."""
    if path.exists():
        with open(path, "rb+") as f:
            data_end = f.seek(0, os.SEEK_END)
            keep = data_end
            while keep > 0:
                step = min(65536, keep)
                f.seek(keep - step)
                block = f.read(step)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    keep = keep - step + cut + 1
                    break
                keep -= step
            if keep != data_end:
                logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                               path, data_end - keep)
                f.truncate(keep)
    new = not path.exists() or path.stat().st_size == 0
    handle = open(path, "a", encoding="utf-8", newline="")
    if new and fmt == "csv":
        handle.write(csv_header(fields))
        handle.flush()
    return handle


