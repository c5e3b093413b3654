"""Metrics of a similarity table (SSR/PA, MTG) and the evaluation entry points."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..metrics.mtg import mtg_alignment
from ..metrics.ssr import bootstrap_ci, grouped_stats, grouped_stats_dict, ssr_stats
from ..metrics.table import SimilarityTable, read_similarity_csv
from .embedding import similarity_table
from .scorers import Benchmark, EmbedFn, Scorer

if TYPE_CHECKING:
    from ..data.sample import Sample

logger = logging.getLogger(__name__)

def summarize_ssr(table: SimilarityTable, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """NearID protocol summary of a table (pooled over sources), JSON-ready.

    Returns:
        ``{"ssr", "pa", "pa_reference", "n_samples", "n_trials", "n_rows", "ci95": {"ssr":
        [lo, hi], "pa": [...], "pa_reference": [...], "n_resamples", "seed"}, "by_source":
        {source: {...}}, "by_category": {category: {...}}}``; rates in percent.

    Raises:
        DatasetError: no row has a valid margin.
    """
    margins = table.margins()
    pooled = ssr_stats(margins)
    ci = bootstrap_ci(margins, n_resamples=n_resamples, seed=seed) if n_resamples > 0 else {}
    summary: dict[str, Any] = {
        "ssr": pooled.ssr,
        "pa": pooled.pa,
        "pa_reference": pooled.pa_reference,
        "n_samples": pooled.n_samples,
        "n_trials": pooled.n_trials,
        "n_successes": pooled.n_successes,
        "n_wins": pooled.n_wins,
        "n_rows": len(table),
        "ci95": {k: list(v) for k, v in ci.items()} | {"n_resamples": n_resamples, "seed": seed},
        "by_source": grouped_stats_dict(grouped_stats(margins, table.sources)),
        "by_category": grouped_stats_dict(grouped_stats(margins, table.categories)),
    }
    summary.update(table.info)
    return summary


def summarize_mtg(table: SimilarityTable, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """MTG summary: the SSR summary (two views, edited copies as distractors) plus MO, MOpair.

    ``mo``/``mopair``/``r`` are null when the table has no oracle values (no masks).
    """
    summary = summarize_ssr(table, n_resamples=n_resamples, seed=seed)
    cross = table.cross_sims
    if np.isfinite(table.oracle[:, :2]).any():
        align = mtg_alignment(
            s_1_1p=cross[:, 0, 0], s_2_2p=cross[:, 1, 1], s_1_2p=cross[:, 0, 1], s_2_1p=cross[:, 1, 0],
            oracle_1=table.oracle[:, 0], oracle_2=table.oracle[:, 1],
        )
        summary.update(mo=_finite_or_none(align.mo), mopair=_finite_or_none(align.mopair),
                       r={k: _finite_or_none(v) for k, v in align.r.items()}, n_alignment_samples=align.n_samples)
    else:
        logger.warning("MTG table has no oracle values (object and part masks): MO and MOpair are not computed")
        summary.update(mo=None, mopair=None, r=None, n_alignment_samples=0)
    return summary


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@dataclass
class EvalResult:
    """One scorer on one benchmark.

    Attributes:
        name: scorer name (table row).
        benchmark: ``"ssr"`` (NearID protocol) or ``"mtg"``.
        summary: JSON-ready metrics (see :func:`summarize_ssr` / :func:`summarize_mtg`).
        table: the per-sample similarity table the metrics come from.
        config: how the result was made (scorer identity, CSV path, options).
    """

    name: str
    benchmark: Benchmark
    summary: dict[str, Any]
    table: SimilarityTable
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Per-sample rows: similarities, margins, counts (the per-sample CSV's content)."""
        return self.table.rows()


def evaluate_table(
    name: str,
    table: SimilarityTable,
    *,
    benchmark: Benchmark = "ssr",
    n_resamples: int = 1000,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Metrics of an already computed similarity table (CSV or model path alike)."""
    if benchmark not in ("ssr", "mtg"):
        raise InvalidInputError(f"benchmark must be 'ssr' or 'mtg', got {benchmark!r}")
    summarize = summarize_mtg if benchmark == "mtg" else summarize_ssr
    return EvalResult(name=name, benchmark=benchmark, table=table,
                      summary=summarize(table, n_resamples=n_resamples, seed=seed), config=dict(config or {}))


def csv_result(
    name: str, path: str | Path, *, benchmark: Benchmark = "ssr", n_resamples: int = 1000, seed: int = 0
) -> EvalResult:
    """Read a reference-format similarity CSV and compute its metrics."""
    # a reference CSV holds one distractor set without naming it: its rows form one source
    table = read_similarity_csv(path, default_source="all" if benchmark == "ssr" else "mtg")
    return evaluate_table(name, table, benchmark=benchmark, n_resamples=n_resamples, seed=seed,
                          config={"csv": str(path)})


def evaluate_dataset(
    scorers: Sequence[Scorer] | Mapping[str, EmbedFn] | Scorer,
    dataset: Iterable["Sample"],
    *,
    benchmark: Benchmark = "ssr",
    sources: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> list[EvalResult]:
    """Evaluate several scorers on one dataset; one :class:`EvalResult` per scorer, in order.

    Args:
        scorers: :class:`Scorer` objects, or ``{name: embed_fn}`` (no masks, batch 32).
        dataset: a reader or a list of samples; materialised once so that every scorer
            sees the same samples.
        benchmark: ``"ssr"`` or ``"mtg"``.
        sources: restrict distractor sources.
        n_resamples, seed: bootstrap settings (``n_resamples=0`` skips the CIs).
    """
    if isinstance(scorers, Scorer):
        scorers = [scorers]
    elif isinstance(scorers, Mapping):
        scorers = [Scorer(name, fn) for name, fn in scorers.items()]
    if not scorers:
        raise InvalidInputError("evaluate_dataset needs at least one scorer")
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"scorer names must be unique, got {names}")
    samples = list(dataset)
    results = []
    for scorer in scorers:
        table = similarity_table(samples, scorer, sources=sources, benchmark=benchmark, progress=progress)
        config = {"scorer": scorer.name, "identity": scorer.identity, "use_masks": scorer.use_masks,
                  "mask_mode": scorer.mask_mode if scorer.use_masks else None,
                  "mask_keep": scorer.mask_keep if scorer.use_masks and scorer.mask_mode == "pixels" else None,
                  "batch_size": scorer.batch_size, "sources": None if sources is None else list(sources),
                  "cache": scorer.cache_path}
        results.append(evaluate_table(scorer.name, table, benchmark=benchmark,
                                      n_resamples=n_resamples, seed=seed, config=config))
    return results


# --------------------------------------------------------------------------- tables


