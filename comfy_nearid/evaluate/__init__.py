"""Evaluate identity scorers: dataset or CSV -> per-sample similarity table -> metrics.

Three layers, kept apart (as pytorch-fid / clean-fid do):

1. embedding: every distinct image of the dataset (views and distractors, deduplicated by
   content key, optionally with its mask) is embedded exactly once, in batches, with a
   progress bar; with ``accelerate launch`` the distinct images are split across processes
   and the embeddings gathered;
2. similarities: :func:`similarity_table` turns the embeddings into one
   :class:`~comfy_nearid.metrics.table.SimilarityTable` row per (sample, distractor source),
   the same table the reference CSV format holds (:func:`read_similarity_csv`);
3. metrics: :func:`summarize_ssr` / :func:`summarize_mtg` (pure numpy, see
   :mod:`comfy_nearid.metrics`), :func:`format_table` for a Table-1-style Markdown table.

A scorer is anything that maps a batch of PIL images (and optionally their object masks) to
``[N, D]`` embeddings; similarities are cosines. :func:`model_scorer` builds one from a
``head:PATH`` / ``pooled:BACKBONE`` / ``mean:BACKBONE`` spec, :func:`feature_scorer` a
hand-made one (``feature:background`` / ``feature:object``) that checks the protocol itself.
Model scorers can read and fill the shared
:class:`~comfy_nearid.embedding_cache.EmbeddingCache`: re-evaluating a dataset with the same
model then runs no forward pass.

Modules: :mod:`.scorers` (scorer specs), :mod:`.embedding` (planning, embedding, similarity
table), :mod:`.summary` (metrics, entry points), :mod:`.formatting` (Markdown tables).
"""

from .embedding import embed_images, similarity_table
from .formatting import format_breakdown, format_table
from .scorers import Benchmark, EmbedFn, Scorer, embedding_scorer, feature_scorer, model_scorer, parse_scorer_spec, region_features
from .summary import EvalResult, csv_result, evaluate_dataset, evaluate_table, summarize_mtg, summarize_ssr

__all__ = [
    "Benchmark",
    "EmbedFn",
    "EvalResult",
    "Scorer",
    "csv_result",
    "embed_images",
    "embedding_scorer",
    "evaluate_dataset",
    "evaluate_table",
    "feature_scorer",
    "format_breakdown",
    "region_features",
    "format_table",
    "model_scorer",
    "parse_scorer_spec",
    "similarity_table",
    "summarize_mtg",
    "summarize_ssr",
]

