"""Partitioned scoring: partition -> reader -> scoring unit -> one parquet file per partition.

The driver (:func:`score_partitions`) embeds every subject's references once, skips the
partitions whose output file exists (``resume``), hands the rest to an *engine* and writes
each partition's rows atomically as the engine returns them; when every partition is done it
fills in the ranks (within each subject, over all partitions) and writes the summary.

Engines are callables ``engine(partitions, references, options, model_identity)`` that yield
``(partition name, rows)``: :class:`LocalEngine` scores in this process, the Ray adapter
(:class:`comfy_nearid.ray.RayEngine`) on a Ray cluster. Both score through
:class:`~comfy_nearid.scoring.unit.ScoringUnit` and :func:`score_partition`. An engine may
also offer ``embed_references(references, batch_size, driver_model) -> (model identity,
embeddings) | None`` (its workers embed the references once, in their own dtype; ``None``:
the driver's model is like the workers', embed on the driver) and ``close()``.

:class:`PartitionRunResult` ``.timings`` holds the driver's phases in seconds
(``references``, ``scoring`` = waiting for the engine, ``writing`` = partition files,
``ranks`` = ranks and summary), which ``benchmarks/bench_ray.py`` prints.

Output folder: ``<name>.parquet`` per partition (columns of ``nearid score``: path, subject,
cosines, score, match, calibrated, rank, error, then a mapping file's label columns, which the
driver attaches by path as it writes), ``_summary.json`` and ``_config.json``; a parquet
reader given the folder sees only the rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DatasetError, InvalidInputError
from .combine import calibration_description
from ..fileio import atomic_write_json
from .outputs import _ranks_within_subjects, summarize_subjects
from .rows import ScoreRow
from .run import check_scoring_options
from .sources import Partition, SubjectField, read_partition
from .unit import ScoringUnit, embed_references

if TYPE_CHECKING:
    import pyarrow as pa

    from ..embedding_cache import EmbeddingCache
    from ..model import IdentityModel

logger = logging.getLogger(__name__)

SUMMARY_NAME = "_summary.json"
CONFIG_NAME = "_config.json"
PARTITION_SUFFIX = ".parquet"


@dataclass(frozen=True)
class PartitionOptions:
    """How each partition is scored (the same on every worker)."""

    aggregate: str = "mean"
    batch_size: int = 32
    num_workers: int = 2  # decode threads per worker
    prefetch_batches: int = 2
    subject: SubjectField = field(default_factory=SubjectField)
    progress: bool = True

    def __post_init__(self) -> None:
        check_scoring_options(self)


@dataclass
class PartitionRunResult:
    """What a completed partitioned run produced."""

    output_dir: Path
    num_partitions: int
    num_resumed_partitions: int
    num_images: int
    num_scored: int
    num_errors: int
    subjects: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds on the driver


Engine = Callable[[Sequence[Partition], Mapping[str, np.ndarray], PartitionOptions, str],
                  Iterable[tuple[str, list[ScoreRow]]]]


# ============================================================================ one partition
def score_partition(unit: ScoringUnit, partition: Partition, options: PartitionOptions) -> list[ScoreRow]:
    """Every row of one partition (ranks not yet filled), in the partition's order."""
    rows: list[ScoreRow] = []
    batches = read_partition(partition, options.batch_size, options.subject)
    for _, batch_rows in unit.score_batches(batches, options.num_workers, options.prefetch_batches):
        rows.extend(batch_rows)
    return rows


def rows_table(rows: Sequence[ScoreRow], label_names: Sequence[str] = (), **constant_columns: Any) -> "pa.Table":
    """Rows as an arrow table with the ``nearid score`` columns, then ``label_names`` (string
    columns from each row's ``labels``, "" where a row has none), then constant columns."""
    import pyarrow as pa

    columns = {
        "path": pa.array([r.path for r in rows], pa.string()),
        "subject": pa.array([r.subject for r in rows], pa.string()),
        "cosines": pa.array([list(r.cosines) for r in rows], pa.list_(pa.float64())),
        "score": pa.array([r.score for r in rows], pa.float64()),
        "match": pa.array([r.match for r in rows], pa.float64()),
        "calibrated": pa.array([r.calibrated for r in rows], pa.bool_()),
        "rank": pa.array([r.rank for r in rows], pa.int64()),
        "error": pa.array([r.error for r in rows], pa.string()),
    }
    for name in label_names:
        columns[name] = pa.array([r.labels.get(name, "") for r in rows], pa.string())
    for name, value in constant_columns.items():
        columns[name] = pa.array([value] * len(rows))
    return pa.table(columns)


def rows_from_table(table: "pa.Table") -> list[ScoreRow]:
    """The inverse of :func:`rows_table` (extra columns ignored)."""
    return [ScoreRow.from_record(rec, "partition rows") for rec in table.to_pylist()]


def partition_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / f"{name}{PARTITION_SUFFIX}"


def write_table_atomic(path: Path, table: "pa.Table") -> None:
    """Write a parquet file through a temporary file and a rename: it exists whole or not at all."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ============================================================================ engines
class LocalEngine:
    """Scores partitions one after another in this process with an already loaded model."""

    def __init__(self, model: "IdentityModel", cache: "EmbeddingCache | None" = None) -> None:
        self.model = model
        self.cache = cache

    def __call__(self, partitions: Sequence[Partition], references: Mapping[str, np.ndarray],
                 options: PartitionOptions, model_identity: str) -> Iterator[tuple[str, list[ScoreRow]]]:
        unit = ScoringUnit(self.model, references, options.aggregate, self.cache)
        for partition in partitions:
            yield partition.name, score_partition(unit, partition, options)


# ============================================================================ driver
def score_partitions(
    model: "IdentityModel",
    partitions: Sequence[Partition],
    references: Mapping[str, Sequence[Path]],
    output_dir: str | Path,
    *,
    options: PartitionOptions = PartitionOptions(),
    engine: Engine | None = None,
    cache: "EmbeddingCache | None" = None,
    resume: bool = False,
    overwrite: bool = False,
    run_config: dict[str, Any] | None = None,
    labels: Mapping[str, Mapping[str, str]] | None = None,
) -> PartitionRunResult:
    """Score every partition into ``output_dir`` and write the summary.

    Args:
        model: the identity model on the driver (embeds the references; the local engine
            also scores with it).
        partitions: what to score (:func:`~comfy_nearid.scoring.sources.shard_partitions`,
            :func:`~comfy_nearid.scoring.sources.plan_partitions`); names must be unique.
        references: subject name -> reference image files.
        output_dir: folder of the partition files, ``_summary.json`` and ``_config.json``.
        options: aggregate, batching, decode threads, where subjects come from.
        engine: who scores (default: :class:`LocalEngine` with ``model``).
        cache: embedding cache for the references (and the local engine's images).
        resume: keep finished partitions (their file exists) and score only the others.
        overwrite: delete the previous outputs first.
        run_config: extra settings recorded in ``_config.json``.
        labels: image path (as in the partitions' items) -> its mapping file's label columns
            (``ScoringPlan`` items' ``labels``; every path the same column names): written
            beside the rows' columns, as ``nearid score`` writes them into its rows file.

    Raises:
        InvalidInputError: outputs exist and neither ``resume`` nor ``overwrite`` is set.
        ConfigError: ``resume`` of outputs written with another model or other settings.
    """
    if resume and overwrite:
        raise InvalidInputError("resume and overwrite exclude each other: resume keeps the rows, overwrite discards them")
    names = [p.name for p in partitions]
    if len(set(names)) != len(names):
        raise DatasetError(f"partition names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    if not partitions:
        raise DatasetError("nothing to score: no partition")
    output_dir = Path(output_dir)
    engine = engine or LocalEngine(model, cache)
    try:
        return _score_partitions(model, partitions, references, output_dir, options, engine, cache, resume,
                                 overwrite, run_config, labels or {})
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


def _score_partitions(model: "IdentityModel", partitions: Sequence[Partition], references: Mapping[str, Sequence[Path]],
                      output_dir: Path, options: PartitionOptions, engine: Engine, cache: "EmbeddingCache | None",
                      resume: bool, overwrite: bool, run_config: dict[str, Any] | None,
                      labels: Mapping[str, Mapping[str, str]]) -> PartitionRunResult:
    from tqdm.auto import tqdm

    from ..embedding_cache import model_cache_identity

    names = [p.name for p in partitions]
    label_names = tuple(next(iter(labels.values()), {}))
    timings = {"references": 0.0, "scoring": 0.0, "writing": 0.0, "ranks": 0.0}
    clock = time.perf_counter()
    # An engine whose workers differ from this process (GPU actors: bf16 by default) embeds
    # the references on a worker like its actors, so every embedding comes from one model.
    embed_on_workers = getattr(engine, "embed_references", None)
    embedded = None if embed_on_workers is None else embed_on_workers(references, options.batch_size, model)
    if embedded is not None:
        identity, reference_embeddings = embedded
    else:
        identity = model_cache_identity(model)
        reference_embeddings = None
    config = {
        "command": "score", "engine_layout": "partitions", "model_identity": identity,
        "calibration": calibration_description(model), "aggregate": options.aggregate,
        "batch_size": options.batch_size, "subject_field": asdict(options.subject),
        "num_partitions": len(partitions), "partitions": names,
        "label_columns": list(label_names),
        "references": {name: [str(p) for p in refs] for name, refs in references.items()},
        **(run_config or {}),
    }
    _prepare_output_dir(output_dir, names, resume, overwrite, config)
    if reference_embeddings is None:
        reference_embeddings = embed_references(model, references, cache, options.batch_size)
    timings["references"] = time.perf_counter() - clock
    atomic_write_json(output_dir / CONFIG_NAME, config)
    todo = [p for p in partitions if not partition_path(output_dir, p.name).exists()]
    resumed = len(partitions) - len(todo)
    logger.info("scoring %d partition(s) (%d already done) of %d subject(s) into %s",
                len(todo), resumed, len(references), output_dir)
    bar = tqdm(total=len(todo), unit="partition", desc="scoring", disable=not options.progress or not todo,
               dynamic_ncols=True)
    images = 0
    pending = {p.name for p in todo}
    if todo:
        clock = time.perf_counter()
        for name, rows in engine(todo, reference_embeddings, options, identity):
            written = time.perf_counter()
            timings["scoring"] += written - clock
            if labels:
                for row in rows:
                    row.labels = dict(labels.get(row.path, {}))
            write_table_atomic(partition_path(output_dir, name), rows_table(rows, label_names))
            clock = time.perf_counter()
            timings["writing"] += clock - written
            pending.discard(name)
            images += len(rows)
            bar.update(1)
            bar.set_postfix(images=images)
        timings["scoring"] += time.perf_counter() - clock  # the engine's end (its last partition's tail)
    bar.close()
    clock = time.perf_counter()
    for name in sorted(pending):  # a partition without any sample yields no rows
        write_table_atomic(partition_path(output_dir, name), rows_table([], label_names))
    result = finalize_partitions(identity, options.aggregate, names, references, output_dir)
    result.num_resumed_partitions = resumed
    timings["ranks"] = time.perf_counter() - clock
    result.timings = timings
    logger.info("driver phases: %s", ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return result


def _prepare_output_dir(output_dir: Path, names: Sequence[str], resume: bool, overwrite: bool,
                        config: dict[str, Any]) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise InvalidInputError(f"output {output_dir} is a file; a partitioned run writes a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    for leftover in output_dir.glob(f".*{PARTITION_SUFFIX}.tmp-*"):  # a killed run's half-written file
        leftover.unlink(missing_ok=True)
    existing = [p for p in [*(partition_path(output_dir, n) for n in names), output_dir / SUMMARY_NAME,
                            output_dir / CONFIG_NAME] if p.exists()]
    if existing and not (resume or overwrite):
        raise InvalidInputError(
            f"output {existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
            "pass --overwrite to replace it or --resume to continue it")
    config_path = output_dir / CONFIG_NAME
    if overwrite:
        previous_names: list[str] = []
        if config_path.exists():  # the previous run's partitions go too, even if this run has others
            try:
                previous_names = list(json.loads(config_path.read_text(encoding="utf-8")).get("partitions") or [])
            except (OSError, json.JSONDecodeError, AttributeError):
                previous_names = []
        for path in [*existing, *(partition_path(output_dir, str(n)) for n in previous_names)]:
            path.unlink(missing_ok=True)
        return
    if resume and config_path.exists():
        try:
            previous = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot resume: {config_path} is unreadable ({e}); use --overwrite") from e
        for name in ("model_identity", "calibration", "aggregate", "batch_size", "subject_field", "partitions",
                     "partition_size", "label_columns"):
            # outputs written before label columns existed hold none
            before = previous.get(name, [] if name == "label_columns" else None)
            if before != config.get(name):
                shown = lambda v: repr(v) if len(repr(v)) < 200 else f"{repr(v)[:200]}..."  # noqa: E731
                raise ConfigError(
                    f"cannot resume {output_dir}: it was written with {name}={shown(before)}, "
                    f"this run uses {shown(config.get(name))}; use the same inputs and settings or --overwrite")


def finalize_partitions(model_identity: str, aggregate: str, names: Sequence[str],
                        references: Mapping[str, Sequence[Path]], output_dir: Path) -> PartitionRunResult:
    """Ranks within each subject over all partitions (as ``nearid score`` ranks: near-ties broken
    by path), written back into each partition file atomically; then ``_summary.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [partition_path(output_dir, n) for n in names]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetError(f"{len(missing)} partition(s) have no output (first: {missing[0]}); run again with --resume")
    parts = [pq.read_table(p, columns=["path", "subject", "score", "match"]) for p in paths]
    lengths = [t.num_rows for t in parts]
    table = pa.concat_tables(parts)
    subject_names = list(references)
    number = {name: i for i, name in enumerate(subject_names)}
    subject_ids = np.array([number.get(s, -1) for s in table.column("subject").to_pylist()], dtype=np.int64)
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    match = table.column("match").to_numpy(zero_copy_only=False).astype(np.float64)
    scores[subject_ids < 0] = np.nan  # a row whose subject has no references is an error row
    row_paths = table.column("path").to_pylist()
    ranks = _ranks_within_subjects(subject_ids, scores, row_paths)
    start = 0
    for path, length in zip(paths, lengths):
        part = pq.read_table(path)
        part_ranks = ranks[start : start + length]
        rank_column = pa.array([int(r) if r else None for r in part_ranks], pa.int64())
        part = part.set_column(part.schema.get_field_index("rank"), "rank", rank_column)
        write_table_atomic(path, part)
        start += length
    summaries = summarize_subjects([(n, references[n]) for n in subject_names], subject_ids, scores, match,
                                   ranks, lambda i: str(row_paths[i]))
    num_scored = int(np.isfinite(scores).sum())
    num_unmatched = int((subject_ids < 0).sum())
    atomic_write_json(output_dir / SUMMARY_NAME, {
        "model_identity": model_identity, "aggregate": aggregate, "num_partitions": len(names),
        "num_images": len(scores), "num_scored": num_scored, "num_errors": len(scores) - num_scored,
        "num_without_subject": num_unmatched, "subjects": summaries,
    })
    return PartitionRunResult(output_dir, len(names), 0, len(scores), num_scored, len(scores) - num_scored, summaries)


def read_partition_rows(output_dir: str | Path) -> list[ScoreRow]:
    """Every row of a finished partitioned run, partitions in the order of ``_config.json``."""
    import pyarrow.parquet as pq

    output_dir = Path(output_dir)
    config_path = output_dir / CONFIG_NAME
    if not config_path.exists():
        raise DatasetError(f"{output_dir} holds no {CONFIG_NAME}; it is not a partitioned `nearid score` output")
    names = json.loads(config_path.read_text(encoding="utf-8"))["partitions"]
    rows: list[ScoreRow] = []
    for name in names:
        rows.extend(rows_from_table(pq.read_table(partition_path(output_dir, name))))
    return rows
