"""Consistency on the synthetic benchmark, with rates tied to the model's own pairwise accuracy.

Sets are built from rendered identities (comfy_nearid.data.synth, object-level distractors)
and embedded by the tiny random-weight model through the subject masks (the head's attention
restricted to the object), so the rates measure this model, not a trained NearID head. The
assertions are guarantees that hold for any embedding, checked on the same images:

- a set of views plus one distractor: if every view is closer to every other view than to the
  distractor (the model's triplets on that set are all right), the distractor has the lowest
  mean similarity to the others, and is flagged when its similarity to the medoid is also
  below the threshold. So rate(lowest) >= fraction of such sets, and likewise for flagged.
- a set mixing two identities: if every same-identity pair is at or above the threshold and
  every cross pair below it, average linkage returns exactly the two identities.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy_nearid.calibration import fit_logistic
from comfy_nearid.consistency import set_consistency
from comfy_nearid.data.synth import SynthConfig, render_identity

N_IDENTITIES = 12
N_VIEWS = 4


def _mask(arr: np.ndarray) -> np.ndarray:
    return (arr > 127).astype(np.float32)


@pytest.fixture(scope="module")
def embedded(tiny_model):
    """Per identity: unit embeddings of the views ``[V, D]`` and of distractor 1 ``[D]``."""
    config = SynthConfig(n_train=N_IDENTITIES, n_test=N_IDENTITIES, n_mtg=0, image_size=64, seed=7,
                         n_views=N_VIEWS, levels=("object",))
    out = {}
    for split in ("train", "test"):
        views, distractors = [], []
        for i in range(N_IDENTITIES):
            r = render_identity(config, split, i)
            images = [r.images[f"view{k}.png"] for k in range(1, N_VIEWS + 1)] + [r.images["object/distractor1.png"]]
            masks = [r.images[f"mask{k}.png"] for k in range(1, N_VIEWS + 1)] + [r.images["object/mask1.png"]]
            emb = tiny_model.embed(list(np.stack(images)), masks=torch.from_numpy(np.stack([_mask(m) for m in masks])))
            emb = emb.numpy().astype(np.float64)
            views.append(emb[:N_VIEWS])
            distractors.append(emb[N_VIEWS])
        out[split] = (views, distractors)
    return out


def _fitted_curve(views, distractors):
    """The model's calibration curve fitted on the train split (same-identity view pairs vs a
    view and its near-identity distractor), as `calibrate` does for a head."""
    same = [float(v[a] @ v[b]) for v in views for a in range(N_VIEWS) for b in range(a + 1, N_VIEWS)]
    near = [float(v[0] @ d) for v, d in zip(views, distractors)]
    return fit_logistic(same, near, source="synthetic train split")


def test_the_distractor_is_found_at_least_as_often_as_the_model_orders_its_triplets(embedded):
    curve = _fitted_curve(*embedded["train"])
    views, distractors = embedded["test"]
    lowest = flagged = perfect = perfect_and_below = 0
    flagged_cal = perfect_and_below_cal = 0
    triplets_right = triplets = 0
    for v, d in zip(views, distractors):
        res = set_consistency(np.concatenate([v, d[None]]))  # no curve: the robust z rule
        res_cal = set_consistency(np.concatenate([v, d[None]]), calibration=curve)  # the curve's 50
        lowest += int(np.argmin(res.mean_to_others)) == N_VIEWS
        flagged += N_VIEWS in res.outliers
        flagged_cal += N_VIEWS in res_cal.outliers
        vv, vd = v @ v.T, v @ d
        right = [vv[a, b] > vd[a] for a in range(N_VIEWS) for b in range(N_VIEWS) if a != b]
        triplets_right += sum(right)
        triplets += len(right)
        perfect += all(right)
        perfect_and_below += all(right) and float(vd.max()) < res.threshold
        perfect_and_below_cal += all(right) and float(vd.max()) < res_cal.threshold
    n = len(views)
    print(f"\nsynthetic distractor sets ({n} sets of {N_VIEWS} views + 1 object-level distractor): "
          f"distractor lowest {lowest}/{n}, flagged as outlier {flagged}/{n} (robust z), {flagged_cal}/{n} (fitted curve's "
          f"50, cosine {curve.midpoint:.4f}); model triplet accuracy "
          f"{triplets_right}/{triplets} = {triplets_right / triplets:.3f}, sets with every triplet right {perfect}/{n} "
          f"(and the distractor below the threshold: {perfect_and_below}/{n} robust z, {perfect_and_below_cal}/{n} curve)")
    assert perfect >= 1  # the bound is not vacuous on these seeds
    assert lowest >= perfect
    assert flagged >= perfect_and_below
    assert flagged_cal >= perfect_and_below_cal


def test_two_identities_split_whenever_the_model_separates_them_at_the_threshold(embedded):
    curve = _fitted_curve(*embedded["train"])
    views, _ = embedded["test"]
    split_right = separable = 0
    pair_right = pairs = 0
    for i in range(len(views)):
        a, b = views[i], views[(i + 1) % len(views)]
        res = set_consistency(np.concatenate([a, b]), calibration=curve)
        assert res.threshold_rule == "calibrated-50" and res.threshold == pytest.approx(curve.midpoint)
        truth = {frozenset(range(N_VIEWS)), frozenset(range(N_VIEWS, 2 * N_VIEWS))}
        got = {frozenset(np.flatnonzero(res.groups == g).tolist()) for g in range(res.num_groups)}
        split_right += got == truth
        within = np.concatenate([(a @ a.T)[np.triu_indices(N_VIEWS, 1)], (b @ b.T)[np.triu_indices(N_VIEWS, 1)]])
        cross = (a @ b.T).ravel()
        separable += bool(within.min() >= res.threshold > cross.max())
        pair_right += int((within[:, None] > cross[None, :]).sum())
        pairs += within.size * cross.size
    n = len(views)
    print(f"\nsynthetic two-identity sets ({n} sets of {N_VIEWS}+{N_VIEWS} views; threshold = fitted curve's 50, "
          f"cosine {curve.midpoint:.4f}): split into the right two groups {split_right}/{n}; model pairwise accuracy "
          f"(same-identity pair above cross pair) {pair_right / pairs:.3f}, sets separated at the threshold {separable}/{n}")
    assert separable >= 1  # the bound is not vacuous on these seeds
    assert split_right >= separable
