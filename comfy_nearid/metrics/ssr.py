"""NearID protocol metrics: margins, SSR, PA (and the reference PA variant), bootstrap CIs.

Pure numpy, float64. Definitions (PROTOCOL.md section 4): for one sample with valid views
``p_0..p_{n-1}`` (n <= 3) and distractors ``d_k`` aligned with ``p_k``, every unordered pair
``i < j`` of views gives two margins::

    m(i->j) = s(p_i, p_j) - s(p_i, d_i)        m(j->i) = s(p_i, p_j) - s(p_j, d_j)

A margin wins when it is strictly > 0; a NaN margin (missing view or distractor) is not a
trial. SSR = share of samples (with >= 1 valid margin) whose valid margins all win; PA =
winning margins / valid margins. The reference PA adds, per counted sample, one extra trial
that wins when the sample's mean margin is > 0 (the quirk behind the published tables).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import DatasetError, InvalidInputError

__all__ = [
    "MARGIN_SLOTS",
    "SSRStats",
    "SampleOutcomes",
    "bootstrap_ci",
    "grouped_stats",
    "margin_slots",
    "margins_from_similarities",
    "pool_stats",
    "sample_outcomes",
    "grouped_stats_dict",
    "ssr_stats",
    "stats_dict",
    "stats_from_outcomes",
]


def margin_slots(n_views: int) -> tuple[tuple[int, int], ...]:
    """(anchor, other) view index pairs in the fixed margin order for ``n_views`` views.

    For every pair i < j in lexicographic order: (i, j) then (j, i). For 3 views:
    ``((0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1))``.
    """
    if n_views < 2:
        raise InvalidInputError(f"n_views must be >= 2 to form a margin, got {n_views}")
    slots: list[tuple[int, int]] = []
    for i in range(n_views):
        for j in range(i + 1, n_views):
            slots += [(i, j), (j, i)]
    return tuple(slots)


MARGIN_SLOTS: tuple[tuple[int, int], ...] = margin_slots(3)


def margins_from_similarities(view_sims: np.ndarray, own_distractor_sims: np.ndarray) -> np.ndarray:
    """Per-sample margins in :func:`margin_slots` order.

    Args:
        view_sims: ``[S, V, V]`` view-view similarities; only the upper triangle
            ``[i, j], i < j`` is read (the matrix is symmetric). NaN = a view is missing.
        own_distractor_sims: ``[S, V]`` with ``[s, i] = s(p_i, d_i)``; NaN = no distractor.

    Returns:
        ``[S, V*(V-1)]`` float64 margins; slot ``(a, b)`` holds ``s(p_a, p_b) - s(p_a, d_a)``.
        NaN where either term is NaN.
    """
    view_sims = np.asarray(view_sims, dtype=np.float64)
    own = np.asarray(own_distractor_sims, dtype=np.float64)
    if view_sims.ndim != 3 or view_sims.shape[1] != view_sims.shape[2]:
        raise InvalidInputError(f"view_sims must have shape [S, V, V], got {view_sims.shape}")
    n_samples, n_views = view_sims.shape[:2]
    if own.shape != (n_samples, n_views):
        raise InvalidInputError(
            f"own_distractor_sims must have shape [S, V] = {(n_samples, n_views)}, got {own.shape}"
        )
    slots = margin_slots(n_views)
    out = np.empty((n_samples, len(slots)), dtype=np.float64)
    for k, (a, b) in enumerate(slots):
        pair_sim = view_sims[:, min(a, b), max(a, b)]
        out[:, k] = pair_sim - own[:, a]
    return out


@dataclass(frozen=True)
class SampleOutcomes:
    """Per-sample counts derived from margins (``S`` = number of rows).

    Attributes:
        n_trials: ``[S]`` int64, valid (non-NaN) margins per sample.
        n_wins: ``[S]`` int64, margins strictly > 0.
        success: ``[S]`` bool, all valid margins win (False where ``n_trials == 0``).
        mean_wins: ``[S]`` bool, mean of the valid margins > 0 (False where ``n_trials == 0``).
    """

    n_trials: np.ndarray
    n_wins: np.ndarray
    success: np.ndarray
    mean_wins: np.ndarray

    @property
    def counted(self) -> np.ndarray:
        """``[S]`` bool: samples with at least one valid margin (the only ones SSR counts)."""
        return self.n_trials > 0


def sample_outcomes(margins: np.ndarray) -> SampleOutcomes:
    """Count trials, wins, success and the reference mean-margin win per sample.

    Args:
        margins: ``[S, M]`` float margins, NaN = not a trial.
    """
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 2:
        raise InvalidInputError(f"margins must have shape [S, M], got {margins.shape}")
    valid = ~np.isnan(margins)
    wins = valid & (np.nan_to_num(margins, nan=0.0) > 0.0)
    n_trials = valid.sum(axis=1).astype(np.int64)
    n_wins = wins.sum(axis=1).astype(np.int64)
    counted = n_trials > 0
    success = counted & (n_wins == n_trials)
    sums = np.where(valid, margins, 0.0).sum(axis=1)
    mean = np.divide(sums, n_trials, out=np.zeros_like(sums), where=counted)
    mean_wins = counted & (mean > 0.0)
    return SampleOutcomes(n_trials=n_trials, n_wins=n_wins, success=success, mean_wins=mean_wins)


@dataclass(frozen=True)
class SSRStats:
    """SSR / PA of a set of samples, in percent, with the counts they come from.

    ``ssr = 100 * n_successes / n_samples``; ``pa = 100 * n_wins / n_trials``;
    ``pa_reference = 100 * (n_wins + n_mean_wins) / (n_trials + n_samples)``.
    Only samples with at least one valid margin are counted in ``n_samples``.
    """

    ssr: float
    pa: float
    pa_reference: float
    n_samples: int
    n_trials: int
    n_successes: int
    n_wins: int
    n_mean_wins: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_counts(
        cls, n_samples: int, n_trials: int, n_successes: int, n_wins: int, n_mean_wins: int
    ) -> "SSRStats":
        """Build from raw counts; refuses an empty set instead of returning NaN."""
        if n_samples <= 0 or n_trials <= 0:
            raise DatasetError(
                "no sample has a valid margin (every sample lacks a second view or a distractor); "
                f"got n_samples={n_samples}, n_trials={n_trials}"
            )
        return cls(
            ssr=100.0 * n_successes / n_samples,
            pa=100.0 * n_wins / n_trials,
            pa_reference=100.0 * (n_wins + n_mean_wins) / (n_trials + n_samples),
            n_samples=int(n_samples),
            n_trials=int(n_trials),
            n_successes=int(n_successes),
            n_wins=int(n_wins),
            n_mean_wins=int(n_mean_wins),
        )


def stats_from_outcomes(outcomes: SampleOutcomes) -> SSRStats:
    """SSR / PA of the samples in ``outcomes`` (raises :class:`DatasetError` when none counts)."""
    counted = outcomes.counted
    return SSRStats.from_counts(
        n_samples=int(counted.sum()),
        n_trials=int(outcomes.n_trials.sum()),
        n_successes=int(outcomes.success.sum()),
        n_wins=int(outcomes.n_wins.sum()),
        n_mean_wins=int(outcomes.mean_wins.sum()),
    )


def ssr_stats(margins: np.ndarray) -> SSRStats:
    """SSR, PA and reference PA (percent) of ``margins`` ``[S, M]`` (NaN = not a trial).

    Raises:
        DatasetError: no sample has a valid margin (an empty set has no SSR, not NaN).
    """
    return stats_from_outcomes(sample_outcomes(margins))


def pool_stats(parts: Iterable[SSRStats]) -> SSRStats:
    """Pool several sets (e.g. distractor sources): samples pooled for SSR, trials for PA.

    Equals :func:`ssr_stats` of the concatenated margins, so pooled SSR is the
    sample-weighted and pooled PA the trial-weighted mean of the parts.
    """
    parts = list(parts)
    return SSRStats.from_counts(
        n_samples=sum(p.n_samples for p in parts),
        n_trials=sum(p.n_trials for p in parts),
        n_successes=sum(p.n_successes for p in parts),
        n_wins=sum(p.n_wins for p in parts),
        n_mean_wins=sum(p.n_mean_wins for p in parts),
    )


def grouped_stats(margins: np.ndarray, groups: Sequence[str]) -> dict[str, SSRStats | None]:
    """SSR / PA per group label (distractor source, category), in first-seen label order.

    Args:
        margins: ``[S, M]`` margins.
        groups: ``S`` labels, one per row.

    Returns:
        label -> stats, or ``None`` for a label whose rows have no valid margin.
    """
    margins = np.asarray(margins, dtype=np.float64)
    if len(groups) != margins.shape[0]:
        raise InvalidInputError(
            f"groups has {len(groups)} labels but margins has {margins.shape[0]} rows"
        )
    labels = np.asarray(list(groups), dtype=object)
    outcomes = sample_outcomes(margins)
    result: dict[str, SSRStats | None] = {}
    for label in dict.fromkeys(groups):
        rows = labels == label
        part = SampleOutcomes(
            n_trials=outcomes.n_trials[rows],
            n_wins=outcomes.n_wins[rows],
            success=outcomes.success[rows],
            mean_wins=outcomes.mean_wins[rows],
        )
        result[str(label)] = stats_from_outcomes(part) if part.counted.any() else None
    return result


def bootstrap_ci(
    margins: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 200,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of SSR, PA and reference PA over samples.

    Counted samples (>= 1 valid margin) are resampled with replacement ``n_resamples``
    times; each resample's SSR / PA / reference PA are recomputed from the per-sample counts.

    Args:
        margins: ``[S, M]`` margins.
        n_resamples: number of bootstrap resamples (>= 1).
        seed: seed of the numpy generator (same seed -> same interval).
        level: coverage in (0, 1).
        chunk: resamples drawn at once (bounds memory at ``chunk * S`` int64).

    Returns:
        ``{"ssr": (lo, hi), "pa": (lo, hi), "pa_reference": (lo, hi)}`` in percent.
    """
    if n_resamples < 1:
        raise InvalidInputError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise InvalidInputError(f"level must be in (0, 1), got {level}")
    outcomes = sample_outcomes(margins)
    keep = outcomes.counted
    n = int(keep.sum())
    if n == 0:
        raise DatasetError("bootstrap needs at least one sample with a valid margin; got none")
    per_sample = np.stack(
        [
            outcomes.success[keep].astype(np.float64),
            outcomes.n_wins[keep].astype(np.float64),
            outcomes.n_trials[keep].astype(np.float64),
            outcomes.mean_wins[keep].astype(np.float64),
        ],
        axis=1,
    )  # [n, 4]
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        # multiplicity of every sample in each resample: [size, n]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        draws.append(counts @ per_sample)  # [size, 4] summed counts
    sums = np.concatenate(draws, axis=0)
    successes, wins, trials, mean_wins = sums.T
    values = {
        "ssr": 100.0 * successes / n,
        "pa": 100.0 * wins / trials,
        "pa_reference": 100.0 * (wins + mean_wins) / (trials + n),
    }
    tail = 100.0 * (1.0 - level) / 2.0
    return {
        key: (float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail)))
        for key, v in values.items()
    }


def stats_dict(stats: SSRStats | None) -> dict[str, float | int | None]:
    """JSON form of one group's stats; an empty group gives zero counts and null rates."""
    if stats is None:
        return {"ssr": None, "pa": None, "pa_reference": None, "n_samples": 0, "n_trials": 0}
    return {
        "ssr": stats.ssr,
        "pa": stats.pa,
        "pa_reference": stats.pa_reference,
        "n_samples": stats.n_samples,
        "n_trials": stats.n_trials,
    }


def grouped_stats_dict(stats: Mapping[str, SSRStats | None]) -> dict[str, dict]:
    """JSON form of :func:`grouped_stats` output."""
    return {label: stats_dict(s) for label, s in stats.items()}
