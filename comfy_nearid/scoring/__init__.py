"""Score folders of generated images against their subjects' reference images.

Three layers, kept apart as in clean-fid/pytorch-fid:

1. **Plans** (no model): which generated image belongs to which subject and which references
   it is scored against. :func:`plan_single_subject`, :func:`plan_from_mapping` and
   :func:`plan_from_subject_folders` build a :class:`ScoringPlan`; every problem a user can
   fix (missing reference, empty folder, unmatched folder) is raised here, before any work.
2. **The streaming scorer** (:func:`score_plan`): decode + preprocess run in a thread pool a
   few batches ahead of the model (Pillow and numpy release the GIL), the model embeds one
   batch at a time, rows are appended and flushed batch by batch, so memory stays flat and
   a crash loses at most the batch in flight. Embeddings go through the
   :class:`~comfy_nearid.embedding_cache.EmbeddingCache`.
3. **Outputs**: one row per (subject, image), a per-subject summary, an optional
   DreamBench++-style JSON; ranks are filled in when the run completes.

Batches are cut at fixed positions of the plan (chunk ``k`` = items ``[k*B, (k+1)*B)``), so a
resumed run and an ``accelerate`` run with chunk ``k`` on process ``k % world`` embed exactly
the same batches as one uninterrupted process: their rows are identical.

Modules: :mod:`.plan` (discovery, plans), :mod:`.rows` (row I/O), :mod:`.combine` (reference
combination, calibrated match), :mod:`.run` (the streaming scorer), :mod:`.outputs` (output
paths, finalisation, summaries), :mod:`.columns` (several scorers in one run, one score column
each), :mod:`.unit` (the engine-agnostic scoring unit), :mod:`.sources` (partitions: folder
slices, parquet and webdataset shards), :mod:`.partitions` (one parquet per partition,
resume; engines, see :mod:`comfy_nearid.ray`).
"""

from .columns import ScorerPass, score_plan_with_scorers
from .combine import AGGREGATES, REFERENCE_COMBINATIONS, aggregate_cosines, combine_references
from .outputs import OutputPaths, ScoringResult
from .plan import (
    ScoreItem,
    ScoringPlan,
    Subject,
    dreambench_key,
    list_images,
    natural_sort_key,
    plan_from_mapping,
    plan_from_subject_folders,
    plan_single_subject,
    read_mapping,
)
from .rows import OUTPUT_FORMATS, ROW_FIELDS, ScoreRow, read_rows
from ..prefetch import prefetch
from .run import DEFAULT_BATCH_SIZE, ProcessShard, RunSettings, ScoringOptions, default_batch_size, score_plan
from .unit import ImageRef, ScoringUnit, embed_references

__all__ = [
    "AGGREGATES",
    "DEFAULT_BATCH_SIZE",
    "OUTPUT_FORMATS",
    "ROW_FIELDS",
    "OutputPaths",
    "ProcessShard",
    "RunSettings",
    "ScoreItem",
    "ScoreRow",
    "ScorerPass",
    "ScoringOptions",
    "ScoringPlan",
    "ScoringResult",
    "ScoringUnit",
    "ImageRef",
    "embed_references",
    "Subject",
    "REFERENCE_COMBINATIONS",
    "aggregate_cosines",
    "combine_references",
    "default_batch_size",
    "dreambench_key",
    "list_images",
    "natural_sort_key",
    "plan_from_mapping",
    "plan_from_subject_folders",
    "plan_single_subject",
    "read_mapping",
    "read_rows",
    "prefetch",
    "score_plan",
    "score_plan_with_scorers",
]

