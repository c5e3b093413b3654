"""SSR / PA / reference PA / bootstrap / pooling against hand-worked values and a loop implementation.

The expected values come from PROTOCOL.md section 4 worked by hand below (every similarity is
a multiple of 1/16, so the margins are exact in binary floating point), from a second,
loop-based implementation written here from the protocol's wording, and from closed forms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_nearid.errors import DatasetError, InvalidInputError
from comfy_nearid.metrics.ssr import (
    MARGIN_SLOTS,
    bootstrap_ci,
    grouped_stats,
    margins_from_similarities,
    pool_stats,
    sample_outcomes,
    ssr_stats,
)

NAN = math.nan


def _views(s01: float, s02: float, s12: float) -> np.ndarray:
    m = np.full((3, 3), NAN)
    m[0, 1] = m[1, 0] = s01
    m[0, 2] = m[2, 0] = s02
    m[1, 2] = m[2, 1] = s12
    return m


# Hand-worked samples (own distractor sims d = [s(p0,d0), s(p1,d1), s(p2,d2)]):
# A: margins 0->1 = .75-.25 = .5 W, 1->0 = .75-.5 = .25 W, 0->2 = .5-.25 = .25 W,
#    2->0 = .5-.625 = -.125 L, 1->2 = .625-.5 = .125 W, 2->1 = .625-.625 = 0 L (a tie loses)
#    -> 6 trials, 4 wins, fails SSR; mean = 1/6 > 0.
# B: view 3 missing: 0->1 = .5-.25 = .25 W, 1->0 = .5-.375 = .125 W -> 2/2, success; mean > 0.
# C: distractor of view 2 missing: 0->1 = .5-.75 L, 1->0 NaN, 0->2 = .5-.75 L, 2->0 = .5-.375 W,
#    1->2 NaN, 2->1 = .5-.375 W -> 4 trials, 2 wins, fails; mean = -0.0625 -> no mean win.
# D: one view only -> no margin, not counted.  E: no distractor at all -> not counted.
# F: 0->1 = .5-.625 = -.125 L, 1->0 = .5-.25 = .25 W -> fails, mean = .0625 > 0 -> mean win.
HAND_VIEWS = np.stack([
    _views(0.75, 0.5, 0.625),
    _views(0.5, NAN, NAN),
    _views(0.5, 0.5, 0.5),
    _views(NAN, NAN, NAN),
    _views(0.5, 0.5, 0.5),
    _views(0.5, NAN, NAN),
])
HAND_OWN = np.array([
    [0.25, 0.5, 0.625],
    [0.25, 0.375, NAN],
    [0.75, NAN, 0.375],
    [0.5, NAN, NAN],
    [NAN, NAN, NAN],
    [0.625, 0.25, NAN],
])
HAND_MARGINS = np.array([
    [0.5, 0.25, 0.25, -0.125, 0.125, 0.0],
    [0.25, 0.125, NAN, NAN, NAN, NAN],
    [-0.25, NAN, -0.25, 0.125, NAN, 0.125],
    [NAN] * 6,
    [NAN] * 6,
    [-0.125, 0.25, NAN, NAN, NAN, NAN],
])


def test_margin_slot_order_is_pairwise_both_directions():
    assert MARGIN_SLOTS == ((0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1))


def test_hand_worked_margins():
    got = margins_from_similarities(HAND_VIEWS, HAND_OWN)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(HAND_MARGINS))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(HAND_MARGINS))


def test_hand_worked_ssr_pa_and_reference_pa():
    stats = ssr_stats(HAND_MARGINS)
    # counted: A, B, C, F (D and E have no valid margin); success: B only
    assert stats.n_samples == 4
    assert stats.n_successes == 1
    assert stats.ssr == pytest.approx(25.0)
    # wins 4 + 2 + 2 + 1 = 9 of trials 6 + 2 + 4 + 2 = 14
    assert (stats.n_wins, stats.n_trials) == (9, 14)
    assert stats.pa == pytest.approx(100 * 9 / 14)
    # reference PA: + one trial per counted sample, won by A, B, F (mean margin > 0)
    assert stats.n_mean_wins == 3
    assert stats.pa_reference == pytest.approx(100 * 12 / 18)


def test_one_losing_margin_fails_ssr_but_counts_wins_in_pa():
    stats = ssr_stats(np.array([[0.1, 0.2, 0.3, 0.4, 0.5, -0.01]]))
    assert stats.ssr == 0.0
    assert stats.pa == pytest.approx(100 * 5 / 6)


def test_sample_without_valid_margin_is_not_counted():
    with_empty = ssr_stats(np.array([[0.1, NAN], [NAN, NAN]]))
    alone = ssr_stats(np.array([[0.1, NAN]]))
    assert with_empty == alone
    assert with_empty.n_samples == 1 and with_empty.ssr == 100.0


def test_empty_set_is_a_clear_error_not_nan():
    with pytest.raises(DatasetError, match="no sample has a valid margin"):
        ssr_stats(np.full((3, 6), NAN))
    with pytest.raises(DatasetError):
        bootstrap_ci(np.full((2, 2), NAN))


def test_bad_shapes_are_refused():
    with pytest.raises(InvalidInputError, match=r"\[S, V, V\]"):
        margins_from_similarities(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(InvalidInputError, match="own_distractor_sims"):
        margins_from_similarities(np.zeros((2, 3, 3)), np.zeros((2, 2)))
    with pytest.raises(InvalidInputError, match="3 labels but margins has 2 rows"):
        grouped_stats(np.zeros((2, 2)), ["a", "b", "c"])


def test_grouped_stats_reports_empty_group_as_none():
    margins = np.array([[0.1, 0.2], [NAN, NAN], [-0.1, 0.3]])
    out = grouped_stats(margins, ["x", "y", "x"])
    assert out["y"] is None
    assert out["x"].n_samples == 2 and out["x"].ssr == 50.0 and out["x"].pa == 75.0


# ------------------------------------------------------------------ second implementation


def _reference_counts(view_sims: np.ndarray, own: np.ndarray) -> tuple[int, int, int, int, int]:
    """Loop implementation of PROTOCOL.md section 4 (independent of the vectorised code)."""
    samples = successes = trials = wins = mean_wins = 0
    for vs, d in zip(view_sims, own):
        margins = []
        for i in range(3):
            for j in range(i + 1, 3):
                pair = vs[i][j]
                if math.isnan(pair):
                    continue  # a view is missing: the pair does not exist
                if not math.isnan(d[i]):
                    margins.append(pair - d[i])
                if not math.isnan(d[j]):
                    margins.append(pair - d[j])
        if not margins:
            continue
        samples += 1
        w = sum(1 for m in margins if m > 0)
        trials += len(margins)
        wins += w
        successes += int(w == len(margins))
        mean_wins += int(sum(margins) / len(margins) > 0)
    return samples, successes, trials, wins, mean_wins


sim_value = st.one_of(st.just(NAN), st.integers(-16, 16).map(lambda k: k / 16))


@st.composite
def similarity_sets(draw, max_samples: int = 12):
    n = draw(st.integers(1, max_samples))
    views = np.full((n, 3, 3), NAN)
    own = np.full((n, 3), NAN)
    for s in range(n):
        present = draw(st.lists(st.booleans(), min_size=3, max_size=3))
        for i in range(3):
            for j in range(i + 1, 3):
                if present[i] and present[j]:
                    views[s, i, j] = views[s, j, i] = draw(st.integers(-16, 16)) / 16
            if present[i]:
                own[s, i] = draw(sim_value)
    return views, own


@settings(max_examples=150, deadline=None)
@given(similarity_sets())
def test_matches_loop_implementation(data):
    views, own = data
    samples, successes, trials, wins, mean_wins = _reference_counts(views, own)
    margins = margins_from_similarities(views, own)
    if samples == 0:
        with pytest.raises(DatasetError):
            ssr_stats(margins)
        return
    stats = ssr_stats(margins)
    assert (stats.n_samples, stats.n_successes, stats.n_trials, stats.n_wins, stats.n_mean_wins) == (
        samples, successes, trials, wins, mean_wins)
    assert stats.ssr == pytest.approx(100 * successes / samples)
    assert stats.pa == pytest.approx(100 * wins / trials)
    assert stats.pa_reference == pytest.approx(100 * (wins + mean_wins) / (trials + samples))


margin_value = st.one_of(st.just(NAN), st.floats(-1, 1, allow_nan=False))
margin_rows = st.lists(st.lists(margin_value, min_size=6, max_size=6), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(margin_rows)
def test_bounds_between_ssr_and_pa(rows):
    margins = np.array(rows, dtype=np.float64)
    outcomes = sample_outcomes(margins)
    if not outcomes.counted.any():
        return
    stats = ssr_stats(margins)
    assert 0.0 <= stats.ssr <= 100.0 and 0.0 <= stats.pa <= 100.0 and 0.0 <= stats.pa_reference <= 100.0
    # every successful sample contributes all its trials as wins
    assert stats.n_wins >= int(outcomes.n_trials[outcomes.success].sum()) >= stats.n_successes
    # a failed sample loses at least one trial
    assert stats.n_trials - stats.n_wins >= stats.n_samples - stats.n_successes
    assert (stats.ssr == 100.0) == (stats.pa == 100.0)
    if stats.pa == 0.0:
        assert stats.ssr == 0.0
    t_min = outcomes.n_trials[outcomes.counted].min()
    t_max = outcomes.n_trials.max()
    # with T_min..T_max trials per sample: SSR * T_min <= PA * T_max (in shares)
    assert stats.n_successes / stats.n_samples * t_min <= stats.n_wins / stats.n_trials * t_max + 1e-12


@settings(max_examples=100, deadline=None)
@given(margin_rows, st.randoms(use_true_random=False))
def test_invariant_to_sample_order(rows, rnd):
    margins = np.array(rows, dtype=np.float64)
    if not sample_outcomes(margins).counted.any():
        return
    order = list(range(len(rows)))
    rnd.shuffle(order)
    assert ssr_stats(margins) == ssr_stats(margins[order])


@settings(max_examples=100, deadline=None)
@given(st.lists(margin_rows, min_size=1, max_size=4))
def test_pooled_equals_weighted_mean_of_sources(parts):
    arrays = [np.array(p, dtype=np.float64) for p in parts]
    per_source = [ssr_stats(a) for a in arrays if sample_outcomes(a).counted.any()]
    if not per_source:
        return
    pooled = pool_stats(per_source)
    concatenated = ssr_stats(np.concatenate(arrays))
    assert pooled == concatenated
    n = sum(s.n_samples for s in per_source)
    t = sum(s.n_trials for s in per_source)
    assert pooled.ssr == pytest.approx(sum(s.ssr * s.n_samples for s in per_source) / n)
    assert pooled.pa == pytest.approx(sum(s.pa * s.n_trials for s in per_source) / t)
    labels = [str(k) for k, a in enumerate(arrays) for _ in range(len(a))]
    grouped = [g for g in grouped_stats(np.concatenate(arrays), labels).values() if g is not None]
    assert pool_stats(grouped) == concatenated


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_all_success_is_degenerate():
    ci = bootstrap_ci(np.full((50, 2), 0.3), n_resamples=200, seed=1)
    assert ci["ssr"] == (100.0, 100.0) and ci["pa"] == (100.0, 100.0)


def test_bootstrap_matches_normal_approximation_and_is_seeded():
    # 400 one-trial samples, half winning: SSR = PA = 50 %, binomial s.e. = sqrt(.25/400) = 2.5 %
    margins = np.where(np.arange(400) % 2 == 0, 0.1, -0.1)[:, None]
    ci = bootstrap_ci(margins, n_resamples=2000, seed=0)
    lo, hi = ci["ssr"]
    assert 50 - 1.96 * 2.5 - 1.0 < lo < 50 - 1.96 * 2.5 + 1.0
    assert 50 + 1.96 * 2.5 - 1.0 < hi < 50 + 1.96 * 2.5 + 1.0
    assert ci["pa"] == ci["ssr"]  # one trial per sample: PA equals SSR in every resample
    assert bootstrap_ci(margins, n_resamples=300, seed=5) == bootstrap_ci(margins, n_resamples=300, seed=5)
    with pytest.raises(InvalidInputError, match="n_resamples"):
        bootstrap_ci(margins, n_resamples=0)
