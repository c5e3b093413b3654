"""Identity consistency within a set of images, without a reference (pure numpy).

"Is it the same subject in all of these, and which one broke?" For a set of ``N`` unit
embeddings (one per image, from :meth:`IdentityModel.embed`):

- the pairwise cosine matrix ``S = E E^T`` ``[N, N]`` (diagonal 1);
- per image: the mean similarity to the *other* images, and the similarity to the set's
  **medoid** (the image with the highest mean similarity to the others; ties: lowest index);
- per set: the mean and the minimum pairwise similarity over the ``N(N-1)/2`` pairs, and the
  calibrated 0..100 match of the mean where the head carries a fitted curve;
- **outliers**: images whose similarity to the medoid is below a cosine threshold ``t``;
- **identity groups**: average-linkage agglomerative clustering at the same ``t``: start from
  single images and repeatedly merge the two groups with the highest *average* pairwise
  similarity while that average is at least ``t``. Groups are numbered by size (largest
  first; ties: the group holding the lowest image index first).

The threshold ``t`` (:func:`resolve_threshold`), in order of precedence:

1. an explicit cosine;
2. the head's calibration curve (``calibrated-50``): the cosine whose match is 50, i.e. the
   point where a pair is as likely the same identity as a near-identity look-alike;
3. otherwise the robust z-score rule (``robust-z``) on the similarities to the medoid of the
   ``N-1`` other images: ``z_i = 0.6745 (s_i - median) / MAD`` (Iglewicz and Hoaglin's
   modified z-score; MAD = median absolute deviation), an image is an outlier when
   ``z_i < -z_max`` (default 3.5), i.e. ``t = median - z_max * MAD / 0.6745``. With
   ``MAD = 0`` (at least half the images equally similar) ``t = median - 1e-6``: only images
   clearly below the common value are outliers. With fewer than 3 other images the rule has
   no spread to measure and flags nothing (``t = -inf``; one group).

Nothing here touches files or models: see :mod:`comfy_nearid.consistency_run` for folders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .calibration import Calibration

__all__ = [
    "DEFAULT_OUTLIER_Z",
    "SetConsistency",
    "average_linkage_groups",
    "describe_groups",
    "head_calibration",
    "medoid_index",
    "resolve_threshold",
    "set_consistency",
    "similarity_matrix",
]

#: Modified z-score below which an image is an outlier (Iglewicz and Hoaglin's 3.5).
DEFAULT_OUTLIER_Z = 3.5
_MAD_SCALE = 0.6745  # MAD of a standard normal: makes the modified z comparable to a z-score
_MAD_ZERO_TOLERANCE = 1e-6


def similarity_matrix(embeddings: Any) -> np.ndarray:
    """Unit embeddings ``[N, D]`` (numpy or torch) -> float64 cosine matrix ``[N, N]``.

    Rows are re-normalised (so a float32 round-off does not put the diagonal off 1), and the
    diagonal is set to exactly 1.
    """
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().double().numpy()
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise InvalidInputError(f"embeddings must be [N, D] with N >= 1 and D >= 1, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise InvalidInputError("embeddings hold NaN or infinite values")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidInputError(f"embedding {int(np.argmin(norms[:, 0]))} is the zero vector; it has no direction")
    emb = emb / norms
    sim = np.clip(emb @ emb.T, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def _mean_to_others(sim: np.ndarray) -> np.ndarray:
    n = sim.shape[0]
    if n == 1:
        return np.ones(1)
    return (sim.sum(axis=1) - np.diag(sim)) / (n - 1)


def medoid_index(sim: np.ndarray) -> int:
    """The image with the highest mean similarity to the others (lowest index on ties)."""
    return int(np.argmax(_mean_to_others(np.asarray(sim, dtype=np.float64))))


def head_calibration(model: Any) -> "Calibration | None":
    """The model's own fitted calibration curve, or None when its head stores none (the
    documented default curve is not a fit, so it does not set thresholds here)."""
    from .calibration import DEFAULT_CALIBRATION, calibration_for

    calibration = calibration_for(model)
    return None if calibration == DEFAULT_CALIBRATION else calibration


def resolve_threshold(
    to_medoid: np.ndarray, medoid: int, calibration: "Calibration | None" = None,
    threshold: float | None = None, outlier_z: float = DEFAULT_OUTLIER_Z,
) -> tuple[float, str]:
    """The cosine threshold of outliers and groups and the rule that set it (see module doc).

    Args:
        to_medoid: similarity of each image to the medoid ``[N]``.
        medoid: the medoid's index (left out of the robust rule's statistics).
        calibration: the head's fitted curve, or None.
        threshold: an explicit cosine in [-1, 1] (takes precedence).
        outlier_z: the robust rule's modified z-score limit (> 0).

    Returns:
        ``(t, rule)`` with ``rule`` one of ``"explicit"``, ``"calibrated-50"``, ``"robust-z"``.
    """
    if threshold is not None:
        if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise InvalidInputError(f"threshold must be a cosine in [-1, 1], got {threshold!r}")
        return float(threshold), "explicit"
    if calibration is not None:
        return float(calibration.cosine_for(50.0)), "calibrated-50"
    if not (math.isfinite(outlier_z) and outlier_z > 0):
        raise InvalidInputError(f"outlier_z must be a positive number, got {outlier_z!r}")
    others = np.delete(np.asarray(to_medoid, dtype=np.float64), medoid)
    if others.size < 3:
        return -math.inf, "robust-z"
    median = float(np.median(others))
    mad = float(np.median(np.abs(others - median)))
    if mad == 0.0:
        return median - _MAD_ZERO_TOLERANCE, "robust-z"
    return median - outlier_z * mad / _MAD_SCALE, "robust-z"


def average_linkage_groups(sim: np.ndarray, threshold: float) -> np.ndarray:
    """Average-linkage clustering of a similarity matrix at ``threshold``.

    Merges the two groups with the highest average pairwise similarity while it is
    ``>= threshold`` (ties: the pair with the lowest indices). Returns int labels ``[N]``:
    group 0 is the largest (ties: the one with the lowest image index), then 1, ...
    """
    sim = np.asarray(sim, dtype=np.float64)
    n = sim.shape[0]
    groups: list[list[int]] = [[i] for i in range(n)]
    # link[a, b] = sum of similarities between groups a and b; average = link / (|a| |b|)
    link = sim.copy()
    active = list(range(n))
    while len(active) > 1:
        best, pair = -math.inf, None
        for x, a in enumerate(active):
            for b in active[x + 1:]:
                avg = link[a, b] / (len(groups[a]) * len(groups[b]))
                if avg > best:
                    best, pair = avg, (a, b)
        if pair is None or best < threshold:
            break
        a, b = pair
        link[a, :] += link[b, :]
        link[:, a] += link[:, b]
        groups[a] = sorted(groups[a] + groups[b])
        active.remove(b)
    members = sorted((groups[a] for a in active), key=lambda g: (-len(g), g[0]))
    labels = np.empty(n, dtype=np.int64)
    for label, group in enumerate(members):
        labels[group] = label
    return labels


def _ranges(indices: Sequence[int]) -> str:
    """``[0,1,2,5,7,8]`` (0-based) -> ``"1-3, 6, 8-9"`` (1-based, as people count images)."""
    parts, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append((start, prev))
            start = prev = i
    if start is not None:
        parts.append((start, prev))
    return ", ".join(f"{a + 1}" if a == b else f"{a + 1}-{b + 1}" for a, b in parts)


def describe_groups(labels: Sequence[int | None]) -> str:
    """``"this set holds 2 identities: images 1-7 and 8-9"`` (1-based image numbers, groups in
    label order; three groups read ``"images 1, 3; 2 and 4-5"``). A label ``None`` or < 0 (an
    unreadable image) belongs to no group."""
    labels = [-1 if g is None else int(g) for g in labels]
    count = max(labels) + 1 if labels else 0
    if count <= 1:
        n = sum(1 for g in labels if g >= 0)
        return f"this set holds {count} identit{'y' if count == 1 else 'ies'} ({n} image{'s' if n != 1 else ''})"
    parts = [_ranges([i for i, g in enumerate(labels) if g == k]) for k in range(count)]
    listed = "; ".join(parts[:-1]) + f" and {parts[-1]}"  # "; " because a group may be "1, 3"
    return f"this set holds {count} identities: images {listed}"


@dataclass
class SetConsistency:
    """Consistency of one set of ``N`` images (indices are 0-based batch/file positions)."""

    matrix: np.ndarray  # float64 [N, N] pairwise cosine, diagonal 1
    mean_to_others: np.ndarray  # float64 [N]
    to_medoid: np.ndarray  # float64 [N]
    medoid: int
    mean_pairwise: float | None  # None for a single image (no pair)
    min_pairwise: float | None
    calibrated_match: float | None  # match of mean_pairwise on the head's fitted curve
    threshold: float  # cosine; -inf when the robust rule cannot flag anything
    threshold_rule: str
    outliers: list[int] = field(default_factory=list)
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # int [N]

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.groups.max()) + 1 if self.groups.size else 0

    @property
    def inliers(self) -> list[int]:
        flagged = set(self.outliers)
        return [i for i in range(self.size) if i not in flagged]

    def describe(self) -> str:
        return describe_groups(self.groups.tolist())

    def summary(self) -> dict[str, Any]:
        """JSON-ready per-set numbers (no matrix)."""
        return {
            "num_images": self.size,
            "mean_pairwise": self.mean_pairwise,
            "min_pairwise": self.min_pairwise,
            "calibrated_match": self.calibrated_match,
            "medoid": self.medoid,
            "threshold": None if math.isinf(self.threshold) else self.threshold,
            "threshold_rule": self.threshold_rule,
            "outliers": list(self.outliers),
            "num_groups": self.num_groups,
            "groups": self.groups.tolist(),
            "description": self.describe(),
        }


def set_consistency(
    embeddings: Any,
    calibration: "Calibration | None" = None,
    threshold: float | None = None,
    outlier_z: float = DEFAULT_OUTLIER_Z,
) -> SetConsistency:
    """Consistency of one set from its unit embeddings ``[N, D]`` (see the module doc).

    Args:
        embeddings: ``[N, D]`` numpy or torch, ``N >= 1``.
        calibration: the head's fitted curve (:func:`head_calibration`), or None.
        threshold: explicit outlier/group cosine threshold (overrides the default rules).
        outlier_z: modified z-score limit of the robust rule.
    """
    sim = similarity_matrix(embeddings)
    n = sim.shape[0]
    mean_others = _mean_to_others(sim)
    medoid = int(np.argmax(mean_others))
    to_medoid = sim[medoid].copy()
    if n > 1:
        pairs = sim[np.triu_indices(n, k=1)]
        mean_pw, min_pw = float(pairs.mean()), float(pairs.min())
    else:
        mean_pw = min_pw = None
    match = None if calibration is None or mean_pw is None else float(calibration.match(mean_pw))
    t, rule = resolve_threshold(to_medoid, medoid, calibration, threshold, outlier_z)
    outliers = [i for i in range(n) if i != medoid and to_medoid[i] < t]
    groups = average_linkage_groups(sim, t)
    return SetConsistency(sim, mean_others, to_medoid, medoid, mean_pw, min_pw, match, t, rule, outliers, groups)
