"""Calibrated 0..100 "identity match" from a raw cosine similarity.

A raw cosine is hard to read: its useful range depends on the backbone and the head. The
identity match puts it on a 0..100 scale with a logistic curve

    match(c) = 100 / (1 + exp(-slope * (c - midpoint)))

``midpoint`` is the cosine that maps to 50 and ``slope`` (per unit of cosine) how quickly the
match moves from 0 to 100 around it.

How a head's curve is fitted (:func:`fit_logistic`): cosines of *same-identity* pairs (two views
of one object in different contexts, label 1) against cosines of *near-identity* pairs (a view
and its near-identity distractor, a different object inpainted into the same background,
label 0), e.g. from the synthetic benchmark (:func:`pairs_from_table` reads them off a
:class:`~comfy_nearid.metrics.table.SimilarityTable`). The fit is a class-balanced logistic
regression with a small ridge penalty on the slope (so it stays finite when the two sets are
perfectly separated), solved by Newton's method. The match is then the probability, in
percent, that a pair at that cosine is the same identity rather than a near-identity
distractor, with both kinds equally likely a priori: 50 means "cannot tell", values near 100
"same object", near 0 "a look-alike".

Where the curve comes from: a head file's metadata field ``calibration`` (written by
:func:`calibrate_head_file` or :func:`comfy_nearid.checkpoint.save_head`) holds
``{"kind": "logistic", "midpoint", "slope", ...}``; :func:`calibration_for` reads it and falls
back to :data:`DEFAULT_CALIBRATION` (midpoint 0.5, slope 10: cosine 0.5 -> 50, 0.8 -> 95.3,
0.2 -> 4.7). The default is a neutral, documented choice, not fitted to any model: scores of
a head without its own calibration are comparable with each other, not across heads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypeVar

import numpy as np

from .errors import CheckpointError, InvalidInputError

if TYPE_CHECKING:
    import torch

    from .metrics.table import SimilarityTable

__all__ = [
    "Calibration",
    "DEFAULT_CALIBRATION",
    "calibrate_head_file",
    "calibration_for",
    "fit_logistic",
    "identity_match",
    "pairs_from_table",
]

KIND = "logistic"
DEFAULT_RIDGE = 1e-3
_ArrayLike = TypeVar("_ArrayLike", float, np.ndarray, "torch.Tensor")


@dataclass(frozen=True)
class Calibration:
    """A logistic map from cosine similarity to a 0..100 identity match.

    Attributes:
        midpoint: the cosine that maps to 50.
        slope: steepness per unit of cosine (> 0).
        source: where the numbers come from (``"default"``, a benchmark name, a file).
        n_same: number of same-identity pairs it was fitted on (0 for the default).
        n_near: number of near-identity pairs it was fitted on.
    """

    midpoint: float
    slope: float
    source: str = "default"
    n_same: int = 0
    n_near: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.midpoint) and -1.0 <= self.midpoint <= 1.0):
            raise InvalidInputError(f"calibration midpoint must be a cosine in [-1, 1], got {self.midpoint!r}")
        if not (math.isfinite(self.slope) and self.slope > 0):
            raise InvalidInputError(f"calibration slope must be finite and > 0, got {self.slope!r}")

    def match(self, cosine: _ArrayLike) -> _ArrayLike:
        """Cosine(s) in [-1, 1] -> identity match in [0, 100] (same type: float, numpy, torch)."""
        if isinstance(cosine, (int, float)):
            return float(_logistic_percent(np.float64(cosine), self.midpoint, self.slope))
        if isinstance(cosine, np.ndarray):
            return _logistic_percent(cosine.astype(np.float64), self.midpoint, self.slope)
        import torch

        if isinstance(cosine, torch.Tensor):
            z = (cosine.double() - self.midpoint) * self.slope
            return (100.0 * torch.sigmoid(z)).to(cosine.dtype if cosine.is_floating_point() else torch.float64)
        raise InvalidInputError(
            f"cosine must be a float, numpy array or torch tensor, got {type(cosine).__name__}"
        )

    def cosine_for(self, match: float) -> float:
        """Inverse of :meth:`match`: the cosine whose match is ``match`` (0 < match < 100)."""
        if not 0.0 < match < 100.0:
            raise InvalidInputError(f"match must be strictly between 0 and 100, got {match!r}")
        p = match / 100.0
        return self.midpoint + math.log(p / (1.0 - p)) / self.slope

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form stored in a head file's ``calibration`` metadata field."""
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<calibration>") -> "Calibration":
        """Parse the metadata form; errors name the field and the file."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: calibration must be a JSON object, got {type(data).__name__}")
        kind = data.get("kind", KIND)
        if kind != KIND:
            raise CheckpointError(f"{source}: calibration kind {kind!r} is not supported (only {KIND!r})")
        fields: dict[str, Any] = {}
        for key, parse in (("midpoint", float), ("slope", float), ("n_same", int), ("n_near", int)):
            if key not in data:
                if key in ("midpoint", "slope"):
                    raise CheckpointError(f"{source}: calibration field {key!r} is missing")
                continue
            try:
                fields[key] = parse(data[key])
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{source}: calibration field {key!r} = {data[key]!r} is invalid") from e
        try:
            return cls(source=str(data.get("source", source)), **fields)
        except InvalidInputError as e:
            raise CheckpointError(f"{source}: {e}") from e


DEFAULT_CALIBRATION = Calibration(midpoint=0.5, slope=10.0, source="default")


def _logistic_percent(x: np.ndarray | np.float64, midpoint: float, slope: float) -> np.ndarray:
    z = (x - midpoint) * slope
    # Split by sign so exp never overflows.
    out = np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
    return 100.0 * out


def identity_match(cosine: _ArrayLike, calibration: Calibration | None = None) -> _ArrayLike:
    """Cosine(s) -> 0..100 identity match with ``calibration`` (default: :data:`DEFAULT_CALIBRATION`)."""
    return (calibration or DEFAULT_CALIBRATION).match(cosine)


def calibration_for(source: Any) -> Calibration:
    """The calibration of a model, a :class:`~comfy_nearid.checkpoint.HeadMetadata`, a head file
    path, or a metadata dict; :data:`DEFAULT_CALIBRATION` when none is stored."""
    if source is None:
        return DEFAULT_CALIBRATION
    if isinstance(source, (str, Path)):
        from .checkpoint import read_head_metadata

        meta = read_head_metadata(source)
        return Calibration.from_dict(meta.calibration, str(source)) if meta.calibration else DEFAULT_CALIBRATION
    if isinstance(source, Mapping):
        return Calibration.from_dict(source)
    meta = getattr(source, "head_metadata", source)  # IdentityModel -> its HeadMetadata
    stored = getattr(meta, "calibration", None)
    if not stored:
        return DEFAULT_CALIBRATION
    name = getattr(source, "head_source", "") or "head metadata"
    return Calibration.from_dict(stored, str(name))


def _as_finite_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise InvalidInputError(f"{name}: no finite cosine to fit on")
    if arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6:
        raise InvalidInputError(
            f"{name}: cosines must lie in [-1, 1], found [{arr.min():.4g}, {arr.max():.4g}]"
        )
    return arr


def fit_logistic(
    same_identity: Sequence[float] | np.ndarray,
    near_identity: Sequence[float] | np.ndarray,
    ridge: float = DEFAULT_RIDGE,
    source: str = "fitted",
    max_iter: int = 100,
) -> Calibration:
    """Fit ``P(same | cosine)`` by class-balanced, ridge-penalised logistic regression.

    Minimises ``0.5 * mean_same(softplus(-(w c + b))) + 0.5 * mean_near(softplus(w c + b))
    + ridge / 2 * w**2`` over ``(w, b)`` by Newton's method with backtracking; returns
    ``slope = w`` and ``midpoint = -b / w``. NaNs are dropped. Raises
    :class:`InvalidInputError` when a set is empty or the fit does not put same-identity pairs
    above near-identity ones (a slope <= 0).
    """
    pos = _as_finite_1d(same_identity, "same_identity")
    neg = _as_finite_1d(near_identity, "near_identity")
    if ridge < 0 or not math.isfinite(ridge):
        raise InvalidInputError(f"ridge must be finite and >= 0, got {ridge!r}")
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    weight = np.concatenate([np.full(pos.size, 0.5 / pos.size), np.full(neg.size, 0.5 / neg.size)])
    design = np.stack([x, np.ones_like(x)], axis=1)  # columns: slope w, intercept b
    penalty = np.diag([ridge, 0.0])

    def loss(theta: np.ndarray) -> float:
        z = design @ theta
        # softplus(-z) for positives, softplus(z) for negatives, computed stably
        per = np.where(y == 1, np.logaddexp(0.0, -z), np.logaddexp(0.0, z))
        return float(weight @ per + 0.5 * ridge * theta[0] ** 2)

    theta = np.zeros(2)
    current = loss(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ theta, -500, 500)))
        grad = design.T @ (weight * (p - y)) + penalty @ theta
        hess = design.T @ (design * (weight * p * (1 - p))[:, None]) + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-10:
            candidate = theta - t * step
            new = loss(candidate)
            if new <= current - 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        else:
            break  # no decrease possible: converged to machine precision
        theta, previous, current = candidate, current, new
        if abs(previous - current) < 1e-14 and np.abs(grad).max() < 1e-10:
            break
    w, b = float(theta[0]), float(theta[1])
    if w <= 0:
        raise InvalidInputError(
            f"cannot calibrate: same-identity cosines (mean {pos.mean():.4f}) are not above "
            f"near-identity cosines (mean {neg.mean():.4f}); the fitted slope is {w:.4g}"
        )
    midpoint = min(1.0, max(-1.0, -b / w))
    return Calibration(midpoint=midpoint, slope=w, source=source, n_same=int(pos.size), n_near=int(neg.size))


def pairs_from_table(table: "SimilarityTable") -> tuple[np.ndarray, np.ndarray]:
    """Same-identity cosines (every view pair ``s(p_i, p_j)``, ``i < j``) and near-identity
    cosines (every view against its own distractor ``s(p_i, d_i)``) of a similarity table;
    missing cells are dropped."""
    views = np.asarray(table.view_sims, dtype=np.float64)
    cross = np.asarray(table.cross_sims, dtype=np.float64)
    n = views.shape[-1]
    iu = np.triu_indices(n, k=1)
    same = views[:, iu[0], iu[1]].reshape(-1)
    near = np.diagonal(cross, axis1=1, axis2=2).reshape(-1)
    return same[np.isfinite(same)], near[np.isfinite(near)]


def calibrate_head_file(
    head_path: str | Path,
    table: "SimilarityTable",
    out_path: str | Path | None = None,
    source: str = "synthetic benchmark",
    ridge: float = DEFAULT_RIDGE,
) -> Calibration:
    """Fit a calibration on ``table`` (made with this head) and store it in the head file's
    metadata (at ``out_path``, default: in place, written atomically)."""
    from .backbones import get_backbone_spec
    from .checkpoint import load_head_file, save_head
    from .head import NearIDHead

    same, near = pairs_from_table(table)
    calibration = fit_logistic(same, near, ridge=ridge, source=source)
    state, meta = load_head_file(head_path)
    head = NearIDHead(meta.head_config)
    head.load_state_dict(state)
    spec = get_backbone_spec(meta.backbone)
    save_head(out_path or head_path, head, spec, provenance=meta.provenance, calibration=calibration.to_dict())
    return calibration
