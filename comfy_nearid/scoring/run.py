"""The streaming scorer: decode/preprocess threads ahead of the model, one batch at a time.

Batches are cut at fixed positions of the plan (chunk ``k`` = items ``[k*B, (k+1)*B)``), so a
resumed run and an ``accelerate`` run with chunk ``k`` on process ``k % world`` embed exactly
the same batches as one uninterrupted process: their rows are identical.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError, ImageLoadError, InvalidInputError
from .combine import REFERENCE_COMBINATIONS, calibrated_matches, calibration_description, combine_references
from ..fileio import atomic_write_json
from .outputs import OutputPaths, ScoringResult, finalize_run
from .plan import ScoreItem, ScoringPlan
from ..launch import hold_if_requested
from .rows import ScoreRow, encode_row, file_fields, open_for_append, row_fields, scan_rows, short_float

if TYPE_CHECKING:
    import torch

    from .unit import ImageRef

    from ..embedding_cache import EmbeddingCache
    from ..model import IdentityModel

logger = logging.getLogger(__name__)

#: Called in the decode threads with ``(path, decoded PIL image or None on a cache hit, file bytes)``.
ImageHook = Callable[[Path, Any, bytes], None]

#: Test-only: ``nearid score`` waits for a signal once this many rows are flushed (see
#: :func:`comfy_nearid.launch.hold_if_requested`), so kill-and-resume tests never race the run.
HOLD_AFTER_ROWS_ENV = "NEARID_SCORE_HOLD_AFTER_ROWS"


# ============================================================================ streaming
@dataclass
class _Prepared:
    """What a decode thread hands the model thread for one item."""

    key: str | None = None
    embedding: np.ndarray | None = None  # a cache hit
    pixels: "torch.Tensor | None" = None  # [3, S, S], to embed (a row of the batch's pixel buffer, when given one)
    error: str | None = None
    file_key: tuple[str, int, int, str] | None = None  # (path, size, mtime_ns, key) to remember


class _ItemPreparer:
    """Key, look up and (on a miss) decode + preprocess one image. Runs in threads.

    The cache key is the decoded pixels' (:func:`~comfy_nearid.embedding_cache.pixels_content_hash`,
    the nodes' key too); an unchanged file (same path, size, mtime) is looked up by the key
    remembered for it, without being read or decoded."""

    def __init__(self, preprocess: Callable[..., "torch.Tensor"], cache: "EmbeddingCache | None", identity: str,
                 on_decoded: "ImageHook | None" = None):
        self.preprocess = preprocess
        self.cache = cache
        self.identity = identity
        self.on_decoded = on_decoded

    def __call__(self, item: "ScoreItem | ImageRef", out: "torch.Tensor | None" = None) -> _Prepared:
        """A :class:`ScoreItem` is read from its file; an :class:`ImageRef` may carry its bytes.
        ``out``: the float32 ``[3, S, S]`` row of the batch's pixel buffer the pixels go to.

        For files, an unchanged file's pixel key is remembered by (path, size, mtime), so a cache
        hit needs neither a decode nor (without an ``on_decoded`` hook) a read."""
        data = getattr(item, "data", None)
        if data is not None:
            return self.prepare_bytes(data, item.path, out=out)
        from ..embedding_cache import file_stat_key
        from ..fileio import regular_file_problem

        problem = regular_file_problem(item.path)  # before opening: a FIFO would block forever
        if problem is not None:
            return _Prepared(error=problem)
        try:
            stat = file_stat_key(item.path)
            if self.cache is not None:
                key = self.cache.remembered_file_keys([stat]).get(stat[0])
                hit = None if key is None else self.cache.get_many(self.identity, [key]).get(key)
                if hit is not None:
                    if self.on_decoded is not None:  # a hook (the report's thumbnails) still gets the bytes
                        self.on_decoded(item.path, None, Path(item.path).read_bytes())
                    return _Prepared(key=key, embedding=hit)
            data = Path(item.path).read_bytes()
        except OSError as e:
            return _Prepared(error=f"cannot read file ({e.strerror or e})")
        return self.prepare_bytes(data, item.path, stat=stat, out=out)

    def prepare_bytes(self, data: bytes, path: "Path | str", stat: "tuple[str, int, int] | None" = None,
                      out: "torch.Tensor | None" = None) -> _Prepared:
        """Decode, key (decoded 8-bit pixels), look up and (on a miss) preprocess one encoded image
        (``path``: its file path or sample key, for messages and the ``on_decoded`` hook;
        ``stat``: the file's (path, size, mtime) when it came from a file, to remember its key;
        ``out``: where the pixels go, see :meth:`__call__`)."""
        from ..embedding_cache import file_stat_key, pixels_content_hash
        from ..images import load_image_bytes

        if not data:
            return _Prepared(error="file is empty (0 bytes)")
        try:
            image = load_image_bytes(data, str(path))
        except ImageLoadError as e:
            return _Prepared(error=e.reason)
        if self.on_decoded is not None:
            self.on_decoded(path, image, data)  # e.g. the report's thumbnail, from this one decode
        if self.cache is None:
            return _Prepared(pixels=self.preprocess(image, out=out))
        key = pixels_content_hash(np.asarray(image, dtype=np.uint8))
        file_key = None
        if stat is not None and stat[1] == len(data):
            try:  # remembered only when the file did not change while it was read
                if file_stat_key(path) == stat:
                    file_key = (*stat, key)
            except OSError:
                pass  # gone since: nothing to remember, the pixels are still good
        hit = self.cache.get_many(self.identity, [key]).get(key)
        if hit is not None:
            return _Prepared(key=key, embedding=hit, file_key=file_key)
        return _Prepared(key=key, pixels=self.preprocess(image, out=out), file_key=file_key)


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class ProcessShard:
    """This process's place in a multi-process run (``accelerate launch``): chunk ``k`` of the
    plan is scored by process ``k % count``; ``barrier`` waits for every process."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = _no_barrier

    @property
    def is_main(self) -> bool:
        return self.index == 0


# Images per forward pass when the user gives none. Measured, not guessed: model-only
# throughput by batch size (`python benchmarks/bench_scoring.py --only throughput`, which
# prints the sweep and this default). On the 2-core CPU, small-siglip gave ~55 img/s at
# batch 8-16, ~48 at 32 and ~43 at 64 (two runs), so the CPU default is 16; larger batches
# only add cache misses there. The CUDA value awaits the GPU suite's sweep (benchmarks/gpu.sh).
DEFAULT_BATCH_SIZE = {"cpu": 16, "cuda": 64}


def default_batch_size(device: "torch.device | str") -> int:
    """Images per forward pass when none is given, for ``device`` (see DEFAULT_BATCH_SIZE)."""
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return DEFAULT_BATCH_SIZE.get(kind, DEFAULT_BATCH_SIZE["cuda"])


@dataclass(frozen=True)
class ScoringOptions:
    """How to score. ``num_workers`` decode threads prepare ``prefetch_batches`` batches ahead."""

    aggregate: str = "mean"
    batch_size: int = 32
    num_workers: int = 2
    prefetch_batches: int = 2
    strict: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_scoring_options(self)


def check_scoring_options(options: Any) -> None:
    """The checks every engine's options share (``aggregate``, ``batch_size``, ``num_workers``,
    ``prefetch_batches``), naming the bad value."""
    if options.aggregate not in REFERENCE_COMBINATIONS:
        raise InvalidInputError(f"aggregate must be one of {REFERENCE_COMBINATIONS}, got {options.aggregate!r}")
    if options.batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {options.batch_size}")
    if options.num_workers < 0 or options.prefetch_batches < 0:
        raise InvalidInputError(
            f"num_workers and prefetch_batches must be >= 0, got {options.num_workers}, {options.prefetch_batches}"
        )


@dataclass(frozen=True)
class RunSettings:
    """How a run scores and treats existing outputs, besides the model, the plan and the
    output paths: the one set of settings of :func:`score_plan` and
    :func:`~comfy_nearid.scoring.columns.score_plan_with_scorers`.

    Attributes:
        options: aggregate, batching, threads, strict mode, progress bar.
        cache: embedding cache (``None``: no cache).
        resume: continue the rows already in the outputs (and any per-process parts).
        overwrite: replace existing outputs.
        shard: this process's place in a multi-process run.
        run_config: extra resolved settings recorded in the config file.
        on_decoded: called in the decode threads with each image read (the report's thumbnails).
    """

    options: ScoringOptions = ScoringOptions()
    cache: "EmbeddingCache | None" = None
    resume: bool = False
    overwrite: bool = False
    shard: ProcessShard = ProcessShard()
    run_config: dict[str, Any] | None = None
    on_decoded: ImageHook | None = None

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise InvalidInputError("resume and overwrite exclude each other: resume keeps the rows, "
                                    "overwrite discards them")

    def check_outputs(self, passes: Sequence[OutputPaths]) -> None:
        """Before any work: every file of every pass is writable, none is a folder, and none
        exists unless ``resume`` or ``overwrite`` is set.

        Raises:
            InvalidInputError: names the path and what to do.
        """
        for outputs in passes:
            for path in outputs.finals():
                if path.is_dir():
                    raise InvalidInputError(f"output {path} is a directory; give a file path")
            outputs.check_writable(self.resume)
        existing = [p for outputs in passes for p in [*outputs.finals(), *outputs.shards()] if p.exists()]
        if existing and not (self.resume or self.overwrite):
            raise InvalidInputError(
                f"output {existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
                "pass --overwrite to replace it or --resume to continue it"
            )


def score_plan(
    model: "IdentityModel",
    plan: ScoringPlan,
    outputs: OutputPaths,
    settings: RunSettings = RunSettings(),
) -> ScoringResult | None:
    """Score every item of ``plan`` and write the outputs.

    Args:
        model: the identity model (``preprocess``, ``embed_pixels``, ``identity``).
        plan: what to score (see :func:`plan_single_subject` and friends).
        outputs: where rows, summary, resolved config and the optional DreamBench JSON go.
        settings: options, cache, resume/overwrite, process shard, recorded config, decode hook.

    Returns:
        The :class:`ScoringResult` on the main process, ``None`` on the others.

    Raises:
        InvalidInputError: outputs exist and neither ``resume`` nor ``overwrite`` is set.
        ConfigError: ``resume`` of outputs written by another model or aggregate.
        ImageLoadError: a reference cannot be read, or (``strict``) a generated image.
    """
    options, cache, shard = settings.options, settings.cache, settings.shard
    config = _resolved_config(model, plan, outputs, options, settings.run_config)
    settings.check_outputs([outputs])
    if settings.resume:
        _check_resumable(outputs, config)
    if outputs.dreambench is not None:
        plan.dreambench_keys()  # a key collision stops the run before any work
    references = _embed_references(model, plan, cache, options.batch_size)
    shard.barrier()
    if shard.is_main:
        if settings.overwrite:
            for path in [*outputs.finals(), *outputs.shards()]:
                path.unlink(missing_ok=True)
        atomic_write_json(outputs.config, config)
    shard.barrier()
    done = _finished_indices(plan, outputs, strict=options.strict)
    shard.barrier()  # nobody appends before every process has read what is done
    todo = _chunks_for(plan, done, options.batch_size, shard)
    journal = outputs.rows if shard.count == 1 else outputs.shard(shard.index, shard.count)
    fmt = outputs.fmt if shard.count == 1 else "jsonl"
    logger.info("scoring %d image(s) of %d subject(s); %d already done%s", len(plan), len(plan.subjects),
                len(done), "" if shard.count == 1 else f"; process {shard.index}/{shard.count}")
    fields = _journal_fields(journal, fmt, plan)
    _run_chunks(model, todo, done, references, journal, fmt, fields, options, cache, shard, settings.on_decoded)
    shard.barrier()
    if not shard.is_main:
        return None
    result = finalize_run(model, plan, outputs, options.aggregate)
    result.num_resumed = len(done)
    return result


def _journal_fields(journal: Path, fmt: str, plan: ScoringPlan) -> tuple[str, ...]:
    """The columns rows are appended with: a CSV file's own header when it has one (a resumed
    finished file may hold ``score:<name>`` columns), else ROW_FIELDS + the plan's labels."""
    if fmt == "csv" and journal.is_file() and journal.stat().st_size > 0:
        return file_fields(journal, fmt)
    return row_fields(plan.label_names)


def _resolved_config(
    model: Any, plan: ScoringPlan, outputs: OutputPaths, options: ScoringOptions, extra: dict[str, Any] | None
) -> dict[str, Any]:
    from .. import __version__
    from ..embedding_cache import model_cache_identity

    return {
        "command": "score",
        "library_version": __version__,
        "model_identity": model_cache_identity(model),
        "calibration": calibration_description(model),
        "aggregate": options.aggregate,
        "format": outputs.fmt,
        "batch_size": options.batch_size,
        "num_images": len(plan),
        "outputs": {
            "rows": str(outputs.rows), "summary": str(outputs.summary),
            "dreambench": None if outputs.dreambench is None else str(outputs.dreambench),
        },
        "subjects": plan.describe(),
        "label_columns": list(plan.label_names),
        **(extra or {}),
    }


def _check_resumable(outputs: OutputPaths, config: dict[str, Any]) -> None:
    """A resumed run continues rows written with the same model and settings only."""
    if outputs.config.exists():
        try:
            previous = json.loads(outputs.config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot resume: {outputs.config} is unreadable ({e}); use --overwrite") from e
        for name in ("model_identity", "calibration", "aggregate", "format", "batch_size"):
            if previous.get(name) != config[name]:
                raise ConfigError(
                    f"cannot resume {outputs.rows}: it was written with {name}={previous.get(name)!r}, "
                    f"this run uses {config[name]!r}; use the same settings or --overwrite"
                )


def _embed_references(
    model: Any, plan: ScoringPlan, cache: "EmbeddingCache | None", batch_size: int
) -> dict[str, np.ndarray]:
    """Each subject's reference embeddings ``[R, D]``, embedded once (through the cache)."""
    from .unit import embed_references

    return embed_references(model, {s.name: s.references for s in plan.subjects}, cache, batch_size)


def _finished_indices(plan: ScoringPlan, outputs: OutputPaths, strict: bool = False) -> set[int]:
    """Plan indices that already have a row in the outputs (rows file and per-process parts).

    Raises:
        ImageLoadError: ``strict`` and a previous row of this plan is an error row (a resumed
            strict run stays strict: it does not finish with the error rows of the last one).
    """
    index_of = {(it.subject, str(it.path)): it.index for it in plan.items}
    done: set[int] = set()
    sources = ([(outputs.rows, outputs.fmt)] if outputs.rows.exists() else []) + [(p, "jsonl") for p in outputs.shards()]
    for path, fmt in sources:
        for _, row in scan_rows(path, fmt):
            idx = index_of.get((row.subject, row.path))
            if idx is not None:
                if strict and row.error:
                    raise ImageLoadError(
                        row.path, f"{row.error} (--strict: the previous run already wrote an error row for it in "
                        f"{path}; fix or remove the file and run with --overwrite, or resume without --strict)"
                    )
                done.add(idx)
    return done


def _chunks_for(plan: ScoringPlan, done: set[int], batch_size: int, shard: ProcessShard) -> list[list[ScoreItem]]:
    """This process's unfinished chunks. A partly finished chunk is embedded whole (its
    finished rows are not written again) so that its batch, and hence every float, is the
    same as in an uninterrupted run."""
    chunks = []
    for k, start in enumerate(range(0, len(plan), batch_size)):
        if k % shard.count != shard.index:
            continue
        chunk = list(plan.items[start : start + batch_size])
        if any(it.index not in done for it in chunk):
            chunks.append(chunk)
    return chunks


def _run_chunks(
    model: Any, chunks: list[list[ScoreItem]], done: set[int], references: dict[str, np.ndarray],
    journal: Path, fmt: str, fields: Sequence[str], options: ScoringOptions, cache: "EmbeddingCache | None",
    shard: ProcessShard, on_decoded: ImageHook | None = None,
) -> None:
    """The streaming loop: prefetched batches -> model -> rows appended (with the columns
    ``fields``) and flushed per batch (rows of items in ``done`` are not written again)."""
    from tqdm.auto import tqdm

    from .unit import ScoringUnit

    total = sum(1 for c in chunks for it in c if it.index not in done)
    if total == 0:
        return
    unit = ScoringUnit(model, references, options.aggregate, cache, on_decoded=on_decoded)
    bar = tqdm(total=total, unit="img", desc="scoring" if shard.count == 1 else f"scoring [{shard.index}]",
               disable=not options.progress, dynamic_ncols=True, smoothing=0.1)
    written = 0
    with open_for_append(journal, fmt, fields) as out:
        for batch, batch_rows in unit.score_batches(chunks, options.num_workers, options.prefetch_batches):
            rows = [row for item, row in zip(batch, batch_rows) if item.index not in done]
            out.write("".join(encode_row(r, fmt, fields) for r in rows))
            out.flush()  # rows survive a crash of this process from here on
            bar.update(len(rows))
            written += len(rows)
            hold_if_requested(HOLD_AFTER_ROWS_ENV, written, "rows")  # test-only switch, no-op unset
            if options.strict:
                failed = next((r for r in rows if r.error), None)
                if failed is not None:
                    bar.close()
                    raise ImageLoadError(failed.path, f"{failed.error} (--strict stops at the first unreadable image)")
    bar.close()


def _embed_batch(model: Any, prepared: list[_Prepared], cache: "EmbeddingCache | None", identity: str,
                 pixels: "torch.Tensor | None" = None) -> list[np.ndarray | None]:
    """Embeddings for a batch: cache hits as they are, the rest in one forward pass.

    ``pixels``: the batch's ``[B, 3, S, S]`` buffer that the items' pixels were written into
    (see :func:`prefetch`); the forward pass reads it as it is when every item needs embedding
    (the usual case), otherwise the rows that do."""
    import torch

    out: list[np.ndarray | None] = [p.embedding for p in prepared]
    todo = [i for i, p in enumerate(prepared) if p.pixels is not None]
    if todo:
        if pixels is None:
            batch = torch.stack([prepared[i].pixels for i in todo])
        elif len(todo) == len(pixels):
            batch = pixels
        else:
            batch = pixels[todo]
        fresh = model.embed_pixels(batch).detach().float().cpu().numpy()
        for j, i in enumerate(todo):
            out[i] = fresh[j]
        if cache is not None:
            cache.put_many(identity, [(prepared[i].key, fresh[j]) for j, i in enumerate(todo)])
    if cache is not None:  # after the embeddings: a remembered key always has its vector
        cache.remember_file_keys([p.file_key for p in prepared if p.file_key is not None])
    return out


def _make_row(item: "ScoreItem | ImageRef", prepared: _Prepared, embedding: np.ndarray | None,
              references: dict[str, np.ndarray], aggregate: str) -> ScoreRow:
    if prepared.error is not None or embedding is None:
        reason = (prepared.error or "no embedding").replace("\n", " ").replace("\r", " ")
        return ScoreRow(str(item.path), item.subject, error=reason, labels=dict(getattr(item, "labels", None) or {}))
    cosines = references[item.subject] @ np.asarray(embedding, dtype=np.float32)
    score = combine_references(np.asarray(embedding)[None, :], references[item.subject], aggregate)[0]
    return ScoreRow(str(item.path), item.subject, tuple(short_float(c) for c in cosines), short_float(score),
                    labels=dict(getattr(item, "labels", None) or {}))


def _fill_calibration(model: Any, rows: list[ScoreRow]) -> None:
    from ..calibration import calibration_for

    scored = [r for r in rows if r.score is not None]
    if scored:
        fitted = calibration_for(model).fitted
        values = calibrated_matches(model, np.array([r.score for r in scored], dtype=np.float64))
        for r, v in zip(scored, values):
            r.match, r.calibrated = short_float(v), fitted


