"""The 0..100 identity match: closed-form values, the logistic fit and the head metadata."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfy_nearid.calibration import (
    DEFAULT_CALIBRATION,
    Calibration,
    calibrate_head_file,
    calibration_for,
    fit_logistic,
    identity_match,
    pairs_from_table,
)
from comfy_nearid.checkpoint import read_head_metadata
from comfy_nearid.errors import CheckpointError, InvalidInputError
from comfy_nearid.metrics.table import SimilarityTable


def test_default_curve_values_by_hand():
    # 100 / (1 + e^{-10 (c - 0.5)}): c = 0.5 -> 50; 0.8 -> 100 / (1 + e^-3) = 95.257...
    assert identity_match(0.5) == pytest.approx(50.0)
    assert identity_match(0.8) == pytest.approx(100 / (1 + math.exp(-3)))
    assert identity_match(0.2) == pytest.approx(100 / (1 + math.exp(3)))
    assert identity_match(0.8) + identity_match(0.2) == pytest.approx(100.0)  # symmetric about the midpoint
    assert DEFAULT_CALIBRATION.cosine_for(95.25741268224334) == pytest.approx(0.8)


def test_match_keeps_the_input_type_and_never_overflows():
    c = Calibration(midpoint=0.3, slope=200.0)
    out_np = c.match(np.array([-1.0, 0.3, 1.0]))
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_allclose(out_np, [0.0, 50.0, 100.0], atol=1e-12)
    out_t = c.match(torch.tensor([-1.0, 0.3, 1.0]))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    torch.testing.assert_close(out_t, torch.tensor([0.0, 50.0, 100.0]))


def test_balanced_fit_recovers_the_gaussian_log_likelihood_ratio():
    # Same ~ N(0.55, 0.08^2), near ~ N(0.25, 0.08^2): the log-likelihood ratio is linear with
    # slope (0.55 - 0.25) / 0.08^2 = 46.875 and crosses 0 at (0.55 + 0.25) / 2 = 0.4.
    # Class sizes differ on purpose: the fit is class-balanced.
    rng = np.random.default_rng(0)
    same = rng.normal(0.55, 0.08, 60_000)
    near = rng.normal(0.25, 0.08, 20_000)
    fitted = fit_logistic(same, near, ridge=0.0)
    assert fitted.slope == pytest.approx(46.875, rel=0.03)
    assert fitted.midpoint == pytest.approx(0.4, abs=0.003)
    assert (fitted.n_same, fitted.n_near) == (60_000, 20_000)


def test_separable_sets_give_a_finite_slope_and_the_gap_midpoint():
    fitted = fit_logistic([0.9, 0.8, 0.85], [0.3, 0.4, 0.35], ridge=1e-3)
    assert math.isfinite(fitted.slope) and fitted.slope > 0
    assert fitted.midpoint == pytest.approx(0.6, abs=1e-6)  # symmetric sets: the middle of the gap
    assert fitted.match(0.8) > 90 and fitted.match(0.4) < 10


def test_fit_refuses_reversed_or_empty_sets():
    with pytest.raises(InvalidInputError, match="not above near-identity"):
        fit_logistic([0.1, 0.2], [0.8, 0.9])
    with pytest.raises(InvalidInputError, match="same_identity: no finite cosine"):
        fit_logistic([float("nan")], [0.5])
    with pytest.raises(InvalidInputError, match=r"near_identity: cosines must lie in \[-1, 1\]"):
        fit_logistic([0.5], [1.5])


def test_pairs_from_table_takes_view_pairs_and_own_distractors():
    arrays = SimilarityTable.empty_arrays(1)
    views, cross = arrays["view_sims"], arrays["cross_sims"]
    views[0, 0, 1] = views[0, 1, 0] = 0.9
    views[0, 0, 2] = views[0, 2, 0] = 0.8  # view 1 - view 2 missing (NaN)
    cross[0, 0, 0], cross[0, 1, 1], cross[0, 0, 1] = 0.4, 0.3, 0.1  # cross_01 is not a near pair
    table = SimilarityTable(ids=["a"], categories=["c"], sources=["s"], view_sims=views, cross_sims=cross)
    same, near = pairs_from_table(table)
    assert sorted(same.tolist()) == [0.8, 0.9]
    assert sorted(near.tolist()) == [0.3, 0.4]


def test_calibration_round_trips_through_the_head_file(tmp_path, tiny_model):
    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head, provenance={"backbone_seed": 0})
    assert calibration_for(head) == DEFAULT_CALIBRATION
    arrays = SimilarityTable.empty_arrays(2)
    arrays["view_sims"][:, 0, 1] = arrays["view_sims"][:, 1, 0] = [0.9, 0.8]
    arrays["cross_sims"][:, 0, 0] = [0.3, 0.4]
    table = SimilarityTable(ids=["a", "b"], categories=["c"] * 2, sources=["s"] * 2, **arrays)
    fitted = calibrate_head_file(head, table)
    meta = read_head_metadata(head)
    assert meta.provenance == {"backbone_seed": 0}
    assert meta.calibration["kind"] == "logistic"
    loaded = calibration_for(head)
    assert loaded.midpoint == pytest.approx(fitted.midpoint) and loaded.slope == pytest.approx(fitted.slope)
    assert loaded.midpoint == pytest.approx(0.6, abs=1e-6)


def test_bad_stored_calibration_names_the_field():
    with pytest.raises(CheckpointError, match="'slope' is missing"):
        Calibration.from_dict({"kind": "logistic", "midpoint": 0.5}, "h.safetensors")
    with pytest.raises(CheckpointError, match="slope must be finite and > 0"):
        Calibration.from_dict({"kind": "logistic", "midpoint": 0.5, "slope": -1})
    with pytest.raises(CheckpointError, match="kind 'isotonic' is not supported"):
        Calibration.from_dict({"kind": "isotonic", "midpoint": 0.5, "slope": 1})
