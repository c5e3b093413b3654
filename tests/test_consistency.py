"""Set consistency (comfy_nearid.consistency) against a second, direct implementation.

The second implementation below computes every number with plain loops over pairs, and the
groups with scipy's average linkage (distance 1 - cosine, cut at 1 - threshold).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from comfy_nearid.calibration import Calibration
from comfy_nearid.consistency import (
    average_linkage_groups,
    describe_groups,
    head_calibration,
    set_consistency,
)
from comfy_nearid.errors import InvalidInputError


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered_embeddings(rng: np.random.Generator, sizes: list[int], spread: float, dim: int = 16) -> np.ndarray:
    centres = _unit(rng.normal(size=(len(sizes), dim)))
    rows = [centres[k] + spread * rng.normal(size=(n, dim)) for k, n in enumerate(sizes)]
    return _unit(np.concatenate(rows))


def _direct(emb: np.ndarray, midpoint: float | None, z_max: float = 3.5) -> dict:
    """Second implementation: loops over pairs, scipy for the clustering."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(emb)
    cos = lambda i, j: 1.0 if i == j else float(np.dot(emb[i], emb[j]))  # noqa: E731
    mean_others = [sum(cos(i, j) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    medoid = max(range(n), key=lambda i: (mean_others[i], -i))
    pairs = [cos(i, j) for i in range(n) for j in range(i + 1, n)]
    to_medoid = [cos(i, medoid) for i in range(n)]
    if midpoint is not None:
        t = midpoint
    else:
        others = sorted(to_medoid[i] for i in range(n) if i != medoid)
        med = float(np.median(others))
        mad = float(np.median([abs(s - med) for s in others]))
        t = med - z_max * mad / 0.6745
    outliers = [i for i in range(n) if i != medoid and to_medoid[i] < t]
    dist = np.array([[0.0 if i == j else 1.0 - cos(i, j) for j in range(n)] for i in range(n)])
    flat = fcluster(linkage(squareform(dist, checks=False), method="average"), t=1.0 - t, criterion="distance")
    return {"mean_others": mean_others, "medoid": medoid, "mean": sum(pairs) / len(pairs), "min": min(pairs),
            "to_medoid": to_medoid, "t": t, "outliers": outliers, "partition": _partition(flat)}


def _partition(labels) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for i, g in enumerate(labels):
        out.setdefault(int(g), set()).add(i)
    return {frozenset(v) for v in out.values()}


@pytest.mark.parametrize("seed,sizes,spread", [(0, [7, 2], 0.15), (1, [5, 4, 3], 0.2), (2, [9], 0.3), (3, [6, 1], 0.1)])
@pytest.mark.parametrize("calibrated", [True, False])
def test_scores_outliers_and_groups_equal_a_direct_computation(seed, sizes, spread, calibrated):
    emb = _clustered_embeddings(np.random.default_rng(seed), sizes, spread)
    calibration = Calibration(midpoint=0.45, slope=12.0, source="test") if calibrated else None
    got = set_consistency(emb, calibration=calibration)
    want = _direct(emb, 0.45 if calibrated else None)
    np.testing.assert_allclose(got.mean_to_others, want["mean_others"], atol=1e-12)
    np.testing.assert_allclose(got.to_medoid, want["to_medoid"], atol=1e-12)
    assert got.medoid == want["medoid"]
    assert got.mean_pairwise == pytest.approx(want["mean"], abs=1e-12)
    assert got.min_pairwise == pytest.approx(want["min"], abs=1e-12)
    assert got.threshold == pytest.approx(want["t"], abs=1e-12)
    assert got.threshold_rule == ("calibrated-50" if calibrated else "robust-z")
    assert got.outliers == want["outliers"]
    assert _partition(got.groups) == want["partition"]
    if calibrated:
        assert got.calibrated_match == pytest.approx(100 / (1 + math.exp(-12.0 * (want["mean"] - 0.45))), abs=1e-9)
    else:
        assert got.calibrated_match is None
    sizes_by_label = [int((got.groups == k).sum()) for k in range(got.num_groups)]
    assert sizes_by_label == sorted(sizes_by_label, reverse=True)


def test_two_identities_are_described_in_one_line():
    # hand-made: images 1-7 are one direction, 8-9 an orthogonal one
    emb = np.zeros((9, 4))
    emb[:7, 0] = 1.0
    emb[7:, 1] = 1.0
    emb[:7, 2] = np.linspace(0, 0.2, 7)  # not all identical
    res = set_consistency(emb, calibration=Calibration(midpoint=0.5, slope=10.0, source="test"))
    assert res.describe() == "this set holds 2 identities: images 1-7 and 8-9"
    assert res.outliers == [7, 8]
    assert describe_groups([0, 1, 0, 2, 2]) == "this set holds 3 identities: images 1, 3; 2 and 4-5"


def test_robust_rule_flags_the_odd_one_and_degenerate_sets_do_not_fail():
    # eight images at cosine ~0.9 to each other, one at ~0.1: the robust rule flags only it
    rng = np.random.default_rng(5)
    emb = _clustered_embeddings(rng, [8], 0.05)
    odd = _unit(rng.normal(size=(1, emb.shape[1])))
    res = set_consistency(np.concatenate([emb, odd]))
    assert res.threshold_rule == "robust-z" and res.outliers == [8]
    one = set_consistency(emb[:1])
    assert one.mean_pairwise is None and one.outliers == [] and one.groups.tolist() == [0]
    two = set_consistency(emb[:2])
    assert two.outliers == [] and two.num_groups == 1 and math.isinf(two.threshold)
    same = set_consistency(np.repeat(emb[:1], 4, axis=0))  # MAD 0: nothing clearly below
    assert same.outliers == [] and same.num_groups == 1


def test_explicit_threshold_and_bad_input():
    emb = _clustered_embeddings(np.random.default_rng(2), [3, 3], 0.1)
    assert set_consistency(emb, threshold=-1.0).num_groups == 1
    assert set_consistency(emb, threshold=1.0).num_groups == 6  # nothing is a perfect match
    with pytest.raises(InvalidInputError, match="threshold"):
        set_consistency(emb, threshold=1.5)
    with pytest.raises(InvalidInputError, match="zero vector"):
        set_consistency(np.zeros((2, 3)))
    with pytest.raises(InvalidInputError, match=r"\[N, D\]"):
        set_consistency(np.zeros((0, 3)))


def test_average_linkage_merges_by_the_average_not_the_closest_pair():
    # a-b 0.9; c is 0.8 to a but 0.0 to b: average 0.4 < 0.5, so c stays alone
    # (single linkage would join it through a)
    sim = np.array([[1.0, 0.9, 0.8], [0.9, 1.0, 0.0], [0.8, 0.0, 1.0]])
    assert average_linkage_groups(sim, 0.5).tolist() == [0, 0, 1]
    assert average_linkage_groups(sim, 0.3).tolist() == [0, 0, 0]


def test_head_calibration_is_none_without_a_fitted_curve(tiny_model):
    assert head_calibration(tiny_model) is None


def test_node_text_is_a_one_based_table_with_the_medoid_and_outliers_on_their_rows():
    """The Consistency node's text: one Markdown row per image, numbered from 1 like the batch,
    the medoid and each outlier marked on its own row, groups numbered from 1 (1 = largest)."""
    pytest.importorskip("torch")
    from nodes.consistency import _preview

    rng = np.random.default_rng(3)
    emb = _clustered_embeddings(rng, [4, 1], spread=0.05)
    result = set_consistency(emb, threshold=0.5)
    text = _preview(result, "cosine")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, result.size + 1))
    for i, row in enumerate(rows):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[1]) == pytest.approx(result.mean_to_others[i], abs=5e-5)
        assert int(cells[3]) == int(result.groups[i]) + 1
        expected = "**medoid**" if i == result.medoid else ("outlier" if i in set(result.outliers) else "")
        assert cells[4] == expected
    assert 4 in result.outliers  # the lone fifth image is the outlier, shown as image 5
    assert rows[4].rstrip().endswith("| outlier |")
