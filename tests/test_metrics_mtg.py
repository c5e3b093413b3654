"""MTG metrics and the correlation helpers against closed forms and numpy's own corrcoef."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_nearid.errors import InvalidInputError
from comfy_nearid.metrics.correlation import fisher_z_mean, pearson_r
from comfy_nearid.metrics.mtg import mtg_alignment, mtg_margins, mtg_oracle, mtg_ssr


def test_oracle_is_one_minus_area_ratio():
    np.testing.assert_allclose(mtg_oracle([25, 0, 50], [100, 40, 50]), [0.75, 1.0, 0.0])
    with pytest.raises(InvalidInputError, match="object_area must be > 0.*index 1"):
        mtg_oracle([1, 1], [10, 0])
    with pytest.raises(InvalidInputError, match="part_area must be >= 0"):
        mtg_oracle([-1], [10])


def test_mtg_ssr_hand_worked():
    # sample 1: s12 = .5, s(1,1p) = .25, s(2,2p) = .75 -> margins +.25 W, -.25 L -> fails
    # sample 2: s12 = .75, .5, .5 -> both win -> success
    # sample 3: s12 = .5, .625, NaN -> one trial, lost
    stats = mtg_ssr([0.5, 0.75, 0.5], [0.25, 0.5, 0.625], [0.75, 0.5, math.nan])
    assert (stats.n_samples, stats.n_successes, stats.n_trials, stats.n_wins) == (3, 1, 5, 3)
    assert stats.ssr == pytest.approx(100 / 3)
    assert stats.pa == pytest.approx(60.0)
    np.testing.assert_array_equal(mtg_margins([0.5], [0.25], [0.75]), [[0.25, -0.25]])


def test_fisher_z_mean_closed_form():
    c = 0.999
    assert fisher_z_mean([1.0, 1.0, -1.0, 0.0], clip=c) == pytest.approx(math.tanh(math.atanh(c) / 4))
    assert fisher_z_mean([0.3]) == pytest.approx(0.3)
    assert fisher_z_mean([0.2, 0.6]) == pytest.approx(math.tanh((math.atanh(0.2) + math.atanh(0.6)) / 2))
    assert math.isnan(fisher_z_mean([0.2, math.nan]))
    with pytest.raises(InvalidInputError):
        fisher_z_mean([])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-50, 50), st.integers(-50, 50)), min_size=3, max_size=40))
def test_pearson_matches_numpy_corrcoef(pairs):
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    r = pearson_r(x, y)
    if x.std() == 0 or y.std() == 0:
        assert math.isnan(r)
    else:
        assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_pearson_refuses_bad_input():
    with pytest.raises(InvalidInputError, match="lengths differ"):
        pearson_r([1, 2, 3], [1, 2])
    with pytest.raises(InvalidInputError, match="at least 2"):
        pearson_r([1], [1])
    with pytest.raises(InvalidInputError, match="finite"):
        pearson_r([1, math.nan, 2], [1, 2, 3])


def test_mo_and_mopair_closed_form():
    oracle_1 = np.array([1.0, 2.0, 3.0, 4.0])
    oracle_2 = np.array([0.5, 0.1, 0.9, 0.3])
    uncorrelated = np.array([1.0, -1.0, -1.0, 1.0])  # zero covariance with oracle_1
    align = mtg_alignment(
        s_1_1p=2 * oracle_1 + 1,       # r = +1
        s_2_2p=oracle_2,               # r = +1
        s_1_2p=-oracle_2,              # r = -1
        s_2_1p=uncorrelated,           # r = 0
        oracle_1=oracle_1,
        oracle_2=oracle_2,
    )
    assert align.r == pytest.approx({"1_1p": 1.0, "2_2p": 1.0, "1_2p": -1.0, "2_1p": 0.0}, abs=1e-12)
    z = math.atanh(0.999)
    assert align.mo == pytest.approx(math.tanh((z + z - z + 0.0) / 4))
    assert align.mopair == pytest.approx(0.999)
    assert align.n_samples == 4


def test_alignment_drops_rows_with_missing_values():
    o = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    s = np.array([0.3, 0.1, math.nan, 0.5, 0.2])
    align = mtg_alignment(s, s, s, s, o, o)
    keep = ~np.isnan(s)
    assert align.n_samples == 4
    assert align.r["1_1p"] == pytest.approx(np.corrcoef(s[keep], o[keep])[0, 1])
