"""Finalising a run: merge rows in plan order, ranks, per-subject summaries, DreamBench++ JSON."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import DatasetError, InvalidInputError
from ..fileio import atomic_write_json
from .plan import ScoringPlan, natural_sort_key
from .rows import (
    OUTPUT_FORMATS, csv_header, decode_row, encode_row, file_fields, format_from_suffix, row_fields, scan_rows,
    short_float,
)

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class OutputPaths:
    """Every file a run writes. ``rows`` is ``.csv`` or ``.jsonl``; the summary and resolved
    config sit beside it (``scores.summary.json``, ``scores.config.json``)."""

    rows: Path
    fmt: str
    summary: Path
    config: Path
    dreambench: Path | None = None

    @classmethod
    def for_rows(
        cls, rows: str | Path, fmt: str | None = None, summary: str | Path | None = None,
        dreambench: str | Path | None = None,
    ) -> "OutputPaths":
        rows = Path(rows)
        fmt = fmt or format_from_suffix(rows)
        if fmt not in OUTPUT_FORMATS:
            raise InvalidInputError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
        stem = rows.with_suffix("") if rows.suffix else rows
        return cls(
            rows=rows, fmt=fmt,
            summary=Path(summary) if summary else stem.with_name(stem.name + ".summary.json"),
            config=stem.with_name(stem.name + ".config.json"),
            dreambench=Path(dreambench) if dreambench else None,
        )

    def check_writable(self, resume: bool) -> None:
        """Refuse, before any work, an output this process cannot write: the rows file (appended
        to on ``resume``, so it must be writable itself) and the summary, config and DreamBench
        JSON (replaced through a temporary file in their folder).

        Raises:
            InvalidInputError: names the path and what to do (see :func:`check_writable`).
        """
        from ..fileio import check_writable

        check_writable(self.rows, "output", existing_ok=resume)
        check_writable(self.summary, "summary output", existing_ok=False)
        check_writable(self.config, "config output", existing_ok=False)
        if self.dreambench is not None:
            check_writable(self.dreambench, "DreamBench++ JSON output", existing_ok=False)

    def finals(self) -> list[Path]:
        return [p for p in (self.rows, self.summary, self.config, self.dreambench) if p is not None]

    def shard(self, index: int, count: int) -> Path:
        return self.rows.with_name(f"{self.rows.name}.part-{index}-of-{count}.jsonl")

    def shards(self) -> list[Path]:
        pattern = re.compile(re.escape(self.rows.name) + r"\.part-\d+-of-\d+\.jsonl$")
        parent = self.rows.parent
        if not parent.is_dir():
            return []
        return sorted((p for p in parent.iterdir() if pattern.match(p.name)), key=lambda p: natural_sort_key(p.name))


@dataclass
class ScoringResult:
    """What a completed run produced (returned on the main process)."""

    outputs: OutputPaths
    num_images: int
    num_scored: int
    num_errors: int
    num_resumed: int
    subjects: dict[str, dict[str, Any]] = field(default_factory=dict)
    scorers: dict[str, dict[str, Any]] = field(default_factory=dict)  # further scorers (see columns.py)




# ============================================================================ finalise
def finalize_run(model: Any, plan: ScoringPlan, outputs: OutputPaths, aggregate: str) -> ScoringResult:
    """Merge the rows (rows file + per-process parts) in plan order, add ranks, write the
    final rows file atomically, the summary and the DreamBench++ JSON."""
    n = len(plan)
    index_of = {(it.subject, str(it.path)): it.index for it in plan.items}
    sources = ([(outputs.rows, outputs.fmt)] if outputs.rows.exists() else []) + [(p, "jsonl") for p in outputs.shards()]
    source_of = np.full(n, -1, dtype=np.int32)
    offset_of = np.zeros(n, dtype=np.int64)
    scores = np.full(n, np.nan)
    calibrated = np.full(n, np.nan)
    dropped = 0
    for s, (path, fmt) in enumerate(sources):
        for offset, row in scan_rows(path, fmt):
            idx = index_of.get((row.subject, row.path))
            if idx is None:
                dropped += 1
                continue
            if source_of[idx] >= 0:
                continue  # a duplicate (e.g. a batch both flushed and redone): the first one stands
            source_of[idx], offset_of[idx] = s, offset
            if row.score is not None:
                scores[idx] = row.score
                calibrated[idx] = np.nan if row.match is None else row.match
    if dropped:
        logger.warning("%d row(s) in the outputs are not part of this plan (files gone or renamed) and were dropped",
                       dropped)
    missing = np.flatnonzero(source_of < 0)
    if missing.size:
        first = plan.items[int(missing[0])]
        raise DatasetError(f"{missing.size} image(s) have no row after the run (first: {first.path}); run again with --resume")
    subject_ids = _subject_ids(plan)
    ranks = _ranks_within_subjects(subject_ids, scores, [str(it.path) for it in plan.items])
    _write_final_rows(plan, outputs, sources, source_of, offset_of, ranks)
    for path in outputs.shards():
        path.unlink()
    summaries = _subject_summaries(plan, subject_ids, scores, calibrated, ranks)
    from ..embedding_cache import model_cache_identity

    from ..calibration import calibration_for

    curve = calibration_for(model)
    atomic_write_json(outputs.summary, {
        "model_identity": model_cache_identity(model), "aggregate": aggregate, "num_images": n,
        # the matches come from a curve fitted for this head (True) or the uncalibrated default
        "calibrated": curve.fitted, "calibration": curve.to_dict(),
        "num_scored": int(np.isfinite(scores).sum()), "num_errors": int((~np.isfinite(scores)).sum()),
        "subjects": summaries,
    })
    if outputs.dreambench is not None:
        _write_dreambench(plan, scores, outputs.dreambench)
    num_scored = int(np.isfinite(scores).sum())
    return ScoringResult(outputs, n, num_scored, n - num_scored, 0, summaries)


def _subject_ids(plan: ScoringPlan) -> np.ndarray:
    number = {s.name: i for i, s in enumerate(plan.subjects)}
    return np.array([number[it.subject] for it in plan.items], dtype=np.int32)


# Scores closer than this count as tied when ranking: batching (cache on/off, batch size,
# another process) moves a cosine by a few float32 steps (~3e-7), and ranks must not follow that noise.
RANK_TIE_TOLERANCE = 1e-6


def _ranks_within_subjects(subject_ids: np.ndarray, scores: np.ndarray, paths: list[str]) -> np.ndarray:
    """Rank 1 = highest score within each subject; errors get 0. Scores equal after rounding
    to :data:`RANK_TIE_TOLERANCE` are ties, broken by path (so the ranks do not depend on
    float noise, the plan's folder order or the cache)."""
    ranks = np.zeros(len(scores), dtype=np.int64)
    valid = np.isfinite(scores)
    decimals = int(round(-np.log10(RANK_TIE_TOLERANCE)))
    rounded = np.round(np.where(valid, scores, 0.0), decimals)
    path_order = np.empty(len(paths), dtype=np.int64)
    path_order[sorted(range(len(paths)), key=lambda i: paths[i])] = np.arange(len(paths))
    for sid in np.unique(subject_ids):
        members = np.flatnonzero((subject_ids == sid) & valid)
        order = members[np.lexsort((path_order[members], -rounded[members]))]
        ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def _write_final_rows(plan: ScoringPlan, outputs: OutputPaths, sources: list[tuple[Path, str]],
                      source_of: np.ndarray, offset_of: np.ndarray, ranks: np.ndarray) -> None:
    """The rows in plan order with their ranks; each row's labels are its plan item's (the
    mapping file of this run decides them, whatever a resumed file held)."""
    tmp = outputs.rows.with_name(outputs.rows.name + ".tmp")
    handles = [open(path, "rb") for path, _ in sources]
    fields = [file_fields(path, fmt) for path, fmt in sources]  # a joined rows file has score:<name> columns
    final_fields = row_fields(plan.label_names)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            if outputs.fmt == "csv":
                out.write(csv_header(final_fields))
            for idx in range(len(source_of)):
                s = int(source_of[idx])
                handles[s].seek(int(offset_of[idx]))
                path, fmt = sources[s]
                row = decode_row(handles[s].readline().decode("utf-8"), fmt, f"{path} at byte {offset_of[idx]}",
                                 fields[s])
                row.rank = int(ranks[idx]) or None
                row.labels = dict(plan.items[idx].labels)
                out.write(encode_row(row, outputs.fmt, final_fields))
    finally:
        for h in handles:
            h.close()
    os.replace(tmp, outputs.rows)


def _subject_summaries(plan: ScoringPlan, subject_ids: np.ndarray, scores: np.ndarray,
                       calibrated: np.ndarray, ranks: np.ndarray) -> dict[str, dict[str, Any]]:
    return summarize_subjects([(s.name, s.references) for s in plan.subjects], subject_ids, scores, calibrated,
                              ranks, lambda i: str(plan.items[i].path))


def summarize_subjects(
    subjects: Sequence[tuple[str, Sequence[Any]]], subject_ids: np.ndarray, scores: np.ndarray,
    calibrated: np.ndarray, ranks: np.ndarray, path_of: Callable[[int], str],
) -> dict[str, dict[str, Any]]:
    """Per-subject counts, mean/median/best score and calibrated match.

    Args:
        subjects: ``(name, reference paths)`` per subject; subject ``k`` owns rows with
            ``subject_ids == k``.
        subject_ids, scores, calibrated, ranks: ``[N]`` per row (NaN score = error row;
            rank 1 = best within the subject).
        path_of: row index -> its path (for ``best_path``).
    """
    out = {}
    for sid, (name, references) in enumerate(subjects):
        members = np.flatnonzero(subject_ids == sid)
        valid = members[np.isfinite(scores[members])]
        entry: dict[str, Any] = {
            "references": [str(p) for p in references],
            "num_images": int(members.size), "num_scored": int(valid.size),
            "num_errors": int(members.size - valid.size),
        }
        if valid.size:
            best = valid[np.argmin(ranks[valid])]  # rank 1
            entry.update(
                mean=float(scores[valid].mean()), median=float(np.median(scores[valid])),
                best=float(scores[best]), best_path=path_of(int(best)),
                match_mean=float(calibrated[valid].mean()),
                match_median=float(np.median(calibrated[valid])),
                match_best=float(calibrated[best]),
            )
        else:
            entry.update(mean=None, median=None, best=None, best_path=None,
                         match_mean=None, match_median=None, match_best=None)
        out[name] = entry
    return out


def _write_dreambench(plan: ScoringPlan, scores: np.ndarray, path: Path) -> None:
    """``{key: 100 * cosine}`` in plan order; images that could not be read are left out."""
    keys = plan.dreambench_keys()
    data = {key: short_float(100.0 * scores[i]) for i, key in enumerate(keys) if np.isfinite(scores[i])}
    skipped = len(keys) - len(data)
    if skipped:
        logger.warning("DreamBench++ JSON %s leaves out %d image(s) that could not be read", path, skipped)
    atomic_write_json(path, data)
