"""Several scorers in one run: one score column per scorer (``nearid score --scorer A --scorer B``).

Each scorer is one ordinary streaming pass of :func:`~comfy_nearid.scoring.run.score_plan`
(cached, resumable, multi-process), loaded just before its pass and released after it, so
memory holds one model at a time. The first scorer writes the rows file itself (``score``,
``calibrated``, ``rank`` are its); every further scorer writes its own rows, summary and
config under ``<rows stem>.scorers/`` and its score is then joined into the rows file as a
``score:<name>`` column and into the summary under ``"scorers"``. A score column therefore
equals what that scorer writes when run alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import DatasetError, InvalidInputError
from ..fileio import atomic_write_json
from .outputs import OutputPaths, ScoringResult
from .plan import ScoringPlan
from .rows import csv_header, encode_row, row_fields, scan_rows
from .run import RunSettings, score_plan

if TYPE_CHECKING:
    from ..model import IdentityModel

logger = logging.getLogger(__name__)

SCORER_PLACEHOLDER = "{scorer}"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+\-]*")


@dataclass(frozen=True)
class ScorerPass:
    """One scorer of a run: its column name and how to load its model (called once, just
    before its pass)."""

    name: str
    load: Callable[[], "IdentityModel"]


def file_safe(name: str) -> str:
    """A scorer name as a file name part (``pooled:siglip2-b16`` -> ``pooled_siglip2-b16``)."""
    return re.sub(r"[^A-Za-z0-9._+\-]", "_", name)


def check_scorer_names(names: Sequence[str]) -> None:
    """Names must be distinct, usable as a column name and distinct as file names."""
    for name in names:
        if not _NAME_PATTERN.fullmatch(name):
            raise InvalidInputError(
                f"scorer name {name!r}: use letters, digits and . _ : + - (give NAME=SPEC to name a scorer)"
            )
    safe = [file_safe(n) for n in names]
    for i, name in enumerate(names):
        if safe.index(safe[i]) != i:
            raise InvalidInputError(f"scorer {name!r} is given twice (or as {names[safe.index(safe[i])]!r})")


def dreambench_path(template: Path | None, name: str, several: bool) -> Path | None:
    """The DreamBench++ JSON of scorer ``name``: ``{scorer}`` in the path is its file-safe
    name (e.g. ``metrics/{scorer}/emu2.json``: one metric folder per scorer, the layout
    ``nearid eval human --metric`` reads); required when there are several scorers."""
    if template is None:
        return None
    text = str(template)
    if SCORER_PLACEHOLDER not in text:
        if several:
            raise InvalidInputError(
                f"--dreambench-json {template}: with several scorers the path must hold {SCORER_PLACEHOLDER} "
                f"(e.g. metrics/{SCORER_PLACEHOLDER}/method.json) so each scorer gets its own file"
            )
        return template
    return Path(text.replace(SCORER_PLACEHOLDER, file_safe(name)))


def scorer_outputs(outputs: OutputPaths, name: str) -> OutputPaths:
    """Where a further scorer's own pass writes: ``<rows stem>.scorers/<name>.<fmt>``."""
    stem = outputs.rows.with_suffix("") if outputs.rows.suffix else outputs.rows
    folder = stem.with_name(stem.name + ".scorers")
    return OutputPaths.for_rows(folder / f"{file_safe(name)}.{outputs.fmt}", outputs.fmt)


def score_plan_with_scorers(
    scorers: Sequence[ScorerPass],
    plan: ScoringPlan,
    outputs: OutputPaths,
    settings: RunSettings = RunSettings(),
    *,
    dreambench_template: Path | None = None,
) -> ScoringResult | None:
    """Score ``plan`` with every scorer; the rows file gets ``score:<name>`` per further scorer.

    ``settings`` are :func:`~comfy_nearid.scoring.run.score_plan`'s, used by every pass
    (``settings.on_decoded`` sees the images the first pass decodes). ``outputs.dreambench`` is
    ignored: ``dreambench_template`` (see :func:`dreambench_path`) gives each scorer's
    DreamBench++ JSON. Returns the first scorer's :class:`ScoringResult` with ``scorers`` = the
    further scorers' per-subject summaries (main process; ``None`` on the others).
    """
    if not scorers:
        raise InvalidInputError("give at least one scorer")
    names = [s.name for s in scorers]
    check_scorer_names(names)
    several = len(scorers) > 1
    passes = [OutputPaths(outputs.rows, outputs.fmt, outputs.summary, outputs.config,
                          dreambench_path(dreambench_template, names[0], several))]
    for name in names[1:]:
        own = scorer_outputs(outputs, name)
        passes.append(OutputPaths(own.rows, own.fmt, own.summary, own.config,
                                  dreambench_path(dreambench_template, name, several)))
    settings.check_outputs(passes)  # every pass's files, before the first pass starts
    results: list[ScoringResult | None] = []
    for i, (scorer, paths) in enumerate(zip(scorers, passes)):
        logger.info("scorer %s -> %s", scorer.name, paths.rows)
        model = scorer.load()
        config = {**(settings.run_config or {}), "scorer": scorer.name, "scorers": names,
                  "device": str(model.device), "dtype": str(model.dtype)}
        results.append(score_plan(model, plan, paths, dataclasses.replace(
            settings, run_config=config, on_decoded=settings.on_decoded if i == 0 else None)))
        del model
    if not settings.shard.is_main:
        return None
    primary = results[0]
    assert primary is not None
    if several:
        _join_score_columns(outputs, passes[1:], names[1:], plan.label_names)
        primary.scorers = _join_summaries(outputs.summary, passes, names)
    return primary


def _join_score_columns(outputs: OutputPaths, extra: Sequence[OutputPaths], names: Sequence[str],
                        label_names: Sequence[str]) -> None:
    """Rewrite the rows file with a ``score:<name>`` column per further scorer. Every pass
    wrote its final rows in plan order, so the files are read side by side (flat memory)."""
    tmp = outputs.rows.with_name(outputs.rows.name + ".tmp")
    readers = [scan_rows(p.rows, p.fmt) for p in extra]
    fields = row_fields(label_names, names)
    with open(tmp, "w", encoding="utf-8", newline="") as out:
        if outputs.fmt == "csv":
            out.write(csv_header(fields))
        for line, (_, row) in enumerate(scan_rows(outputs.rows, outputs.fmt), start=1):
            for name, paths, reader in zip(names, extra, readers):
                other = next(reader, None)
                if other is None or (other[1].subject, other[1].path) != (row.subject, row.path):
                    raise DatasetError(
                        f"{paths.rows} does not line up with {outputs.rows} at row {line} ({row.path}); "
                        "run again with --overwrite"
                    )
                row.scorer_scores[name] = other[1].score
            out.write(encode_row(row, outputs.fmt, fields))
    os.replace(tmp, outputs.rows)


def _join_summaries(summary: Path, passes: Sequence[OutputPaths], names: Sequence[str]) -> dict[str, Any]:
    """Add ``"scorer"`` and ``"scorers"`` (each further scorer's model identity, rows file and
    per-subject statistics) to the first scorer's summary; return the ``"scorers"`` part."""
    import json

    data = json.loads(summary.read_text(encoding="utf-8"))
    scorers: dict[str, Any] = {}
    keep = ("num_scored", "num_errors", "mean", "median", "best", "best_path")
    for name, paths in zip(names[1:], passes[1:]):
        own = json.loads(paths.summary.read_text(encoding="utf-8"))
        scorers[name] = {
            "model_identity": own.get("model_identity"), "rows": str(paths.rows),
            "dreambench": None if paths.dreambench is None else str(paths.dreambench),
            "subjects": {subject: {k: s.get(k) for k in keep} for subject, s in own["subjects"].items()},
        }
    data["scorer"] = names[0]
    data["scorers"] = scorers
    atomic_write_json(summary, data)
    return scorers
