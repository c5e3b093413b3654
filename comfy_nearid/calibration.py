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
a head without its own calibration are comparable with each other, not across heads, and every
place that shows a match says so (``calibrated: false``, "uncalibrated"):
:attr:`Calibration.fitted` tells the two apart.

Checking a curve (:func:`reliability_report`): on pairs it was *not* fitted on, the expected
calibration error (ECE, 10 equal-width bins of the predicted probability), the Brier score,
the accuracy of the rule "match >= 50 means same identity", and the best accuracy any single
cosine threshold reaches on the same pairs. Every statistic weighs the two kinds of pairs
equally (each kind carries half the weight), because the match is a probability at equal
priors. :func:`fit_calibration` fits and checks in one call and records the provenance;
:func:`write_head_calibration` stores the curve in a head file atomically, leaving the
tensors byte for byte as they were.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypeVar

import numpy as np

from .errors import CheckpointError, InvalidInputError

if TYPE_CHECKING:
    import torch

    from .metrics.table import SimilarityTable

__all__ = [
    "Calibration",
    "CalibrationFit",
    "DEFAULT_CALIBRATION",
    "ECE_BINS",
    "ReliabilityReport",
    "best_threshold",
    "calibrate_head_file",
    "calibration_for",
    "fit_calibration",
    "fit_logistic",
    "identity_match",
    "pairs_from_dataset",
    "pairs_from_table",
    "reliability_diagram",
    "reliability_report",
    "write_head_calibration",
]

logger = logging.getLogger(__name__)

KIND = "logistic"
DEFAULT_RIDGE = 1e-8  # weak: it keeps the slope finite when the two sets are separated; the relative
# shrinkage of a fitted slope is about ridge / (var(cosine) x mean p(1-p)), ~1e-4 for real heads
ECE_BINS = 10  # equal-width bins of the predicted probability
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
        provenance: how it was fitted: data, split, pair counts, date, and the reliability
            statistics (JSON-ready; see :func:`fit_calibration`).
    """

    midpoint: float
    slope: float
    source: str = "default"
    n_same: int = 0
    n_near: int = 0
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def fitted(self) -> bool:
        """True when the curve was fitted on pairs of both kinds (not the default, not set by hand)."""
        return self.n_same > 0 and self.n_near > 0

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
        out: dict[str, Any] = {"kind": KIND, "midpoint": self.midpoint, "slope": self.slope, "source": self.source,
                               "n_same": self.n_same, "n_near": self.n_near}
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out

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
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, Mapping):
            raise CheckpointError(f"{source}: calibration field 'provenance' must be a JSON object")
        try:
            return cls(source=str(data.get("source", source)), provenance=dict(provenance), **fields)
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
    """Same-identity cosines (every view pair ``s(p_i, p_j)``, ``i < j``, once per sample even
    when the sample has a row per distractor source) and near-identity cosines (every view
    against its own distractor ``s(p_i, d_i)``, every source) of a similarity table; missing
    cells are dropped."""
    views = np.asarray(table.view_sims, dtype=np.float64)
    cross = np.asarray(table.cross_sims, dtype=np.float64)
    first_rows = sorted({sample_id: r for r, sample_id in reversed(list(enumerate(table.ids)))}.values())
    n = views.shape[-1]
    iu = np.triu_indices(n, k=1)
    same = views[first_rows][:, iu[0], iu[1]].reshape(-1)
    near = np.diagonal(cross, axis1=1, axis2=2).reshape(-1)
    return same[np.isfinite(same)], near[np.isfinite(near)]


def write_head_calibration(
    head_path: str | Path, calibration: Calibration | None, out_path: str | Path | None = None
) -> Path:
    """Store ``calibration`` (None: remove it) in a head file's metadata, in place or at
    ``out_path``, atomically: readers see the old file or the whole new one. The tensors are
    copied as they are stored (byte for byte); the other metadata fields are kept."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import _atomic_save, read_head_metadata

    src = Path(head_path)
    dst = Path(out_path) if out_path is not None else src
    if dst.suffix != ".safetensors":
        raise InvalidInputError(f"head files are .safetensors; got {dst}")
    read_head_metadata(src)  # refuses a file that is not a NearID head, naming it
    try:
        with safe_open(str(src), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read head file {src}: {e}") from e
    if calibration is None:
        metadata.pop("calibration", None)
    else:
        import json

        metadata["calibration"] = json.dumps(calibration.to_dict(), sort_keys=True)
    _atomic_save(tensors, metadata, dst)
    return dst


def calibrate_head_file(
    head_path: str | Path,
    table: "SimilarityTable",
    out_path: str | Path | None = None,
    source: str = "synthetic benchmark",
    ridge: float = DEFAULT_RIDGE,
) -> Calibration:
    """Fit a calibration on ``table`` (made with this head) and store it in the head file's
    metadata (at ``out_path``, default: in place, written atomically)."""
    same, near = pairs_from_table(table)
    fit = fit_calibration(same, near, data=source, ridge=ridge)
    write_head_calibration(head_path, fit.calibration, out_path)
    return fit.calibration


# --------------------------------------------------------------------------- checking a curve


@dataclass
class ReliabilityReport:
    """How well a curve's match reads as a probability on some pairs (class-balanced: each
    kind of pair carries half the weight).

    Attributes:
        ece: expected calibration error, ``sum_b W_b |mean match_b / 100 - share same_b|``
            over :data:`ECE_BINS` equal-width bins of the predicted probability (0..1).
        brier: mean squared difference between the probability and the label (0..1).
        accuracy_at_50: accuracy of "match >= 50 means same identity" (0..1).
        best_accuracy: the best accuracy of any single cosine threshold on these pairs (0..1).
        best_threshold: that threshold (cosine ``>= t`` = same identity); ``best_match`` its match.
        n_same, n_near: pairs of each kind.
        bins: per bin ``lo``, ``hi``, ``pairs``, ``weight``, ``predicted`` and ``observed``
            (None for an empty bin).
    """

    ece: float
    brier: float
    accuracy_at_50: float
    best_accuracy: float
    best_threshold: float
    best_match: float
    n_same: int
    n_near: int
    bins: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"ece": self.ece, "brier": self.brier, "accuracy_at_50": self.accuracy_at_50,
                "best_accuracy": self.best_accuracy, "best_threshold": self.best_threshold,
                "best_match": self.best_match, "n_same": self.n_same, "n_near": self.n_near, "bins": self.bins}

    def summary_line(self) -> str:
        return (f"ECE {self.ece:.4f}, Brier {self.brier:.4f}, accuracy at 50 {100 * self.accuracy_at_50:.2f}%, "
                f"best single threshold {100 * self.best_accuracy:.2f}% (cosine {self.best_threshold:.4f}, "
                f"match {self.best_match:.1f}); {self.n_same} same-identity / {self.n_near} near-identity pairs")


def _balanced_weights(n_same: int, n_near: int) -> np.ndarray:
    return np.concatenate([np.full(n_same, 0.5 / n_same), np.full(n_near, 0.5 / n_near)])


def best_threshold(same_identity: Sequence[float] | np.ndarray,
                   near_identity: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(threshold, accuracy)``: the cosine threshold ``t`` (``cosine >= t`` = same identity)
    with the highest class-balanced accuracy; the midpoint between neighbouring cosines where
    the accuracy changes, so that it does not sit on a data point."""
    pos = _as_finite_1d(same_identity, "same_identity")
    neg = _as_finite_1d(near_identity, "near_identity")
    x = np.concatenate([pos, neg])
    w_same = np.concatenate([np.full(pos.size, 0.5 / pos.size), np.zeros(neg.size)])
    w_near = np.concatenate([np.zeros(pos.size), np.full(neg.size, 0.5 / neg.size)])
    order = np.argsort(x, kind="stable")
    xs, ws, wn = x[order], w_same[order], w_near[order]
    # Threshold just above the first k sorted values: near pairs among them are right, same
    # pairs among the rest are right. Only cut between distinct values.
    near_below = np.concatenate([[0.0], np.cumsum(wn)])
    same_below = np.concatenate([[0.0], np.cumsum(ws)])
    accuracy = near_below + (0.5 - same_below)
    cuts = np.concatenate([[True], xs[1:] > xs[:-1], [True]])
    candidates = np.flatnonzero(cuts)
    k = int(candidates[np.argmax(accuracy[candidates])])
    if k == 0:
        threshold = float(xs[0]) - 1e-6
    elif k == xs.size:
        threshold = float(xs[-1]) + 1e-6
    else:
        threshold = 0.5 * float(xs[k - 1] + xs[k])
    return threshold, float(accuracy[k])


def reliability_report(calibration: Calibration, same_identity: Sequence[float] | np.ndarray,
                       near_identity: Sequence[float] | np.ndarray, bins: int = ECE_BINS) -> ReliabilityReport:
    """ECE, Brier score, accuracy at 50 and the best single threshold of ``calibration`` on
    these pairs (see :class:`ReliabilityReport`); NaNs are dropped."""
    pos = _as_finite_1d(same_identity, "same_identity")
    neg = _as_finite_1d(near_identity, "near_identity")
    prob = np.asarray(calibration.match(np.concatenate([pos, neg])), dtype=np.float64) / 100.0
    label = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    weight = _balanced_weights(pos.size, neg.size)
    which = np.minimum((prob * bins).astype(np.int64), bins - 1)  # equal-width; p = 1 in the last bin
    ece = 0.0
    table = []
    for b in range(bins):
        sel = which == b
        w = float(weight[sel].sum())
        entry: dict[str, Any] = {"lo": b / bins, "hi": (b + 1) / bins, "pairs": int(sel.sum()), "weight": w,
                                 "predicted": None, "observed": None}
        if sel.any():
            predicted = float(weight[sel] @ prob[sel]) / w
            observed = float(weight[sel] @ label[sel]) / w
            entry.update(predicted=predicted, observed=observed)
            ece += w * abs(predicted - observed)
        table.append(entry)
    brier = float(weight @ (prob - label) ** 2)
    accuracy_at_50 = float(weight @ ((prob >= 0.5) == (label == 1)))
    threshold, best = best_threshold(pos, neg)
    return ReliabilityReport(
        ece=float(ece), brier=brier, accuracy_at_50=accuracy_at_50, best_accuracy=best,
        best_threshold=threshold, best_match=float(calibration.match(threshold)),
        n_same=int(pos.size), n_near=int(neg.size), bins=table,
    )


@dataclass
class CalibrationFit:
    """A fitted curve and its checks: ``fit_report`` on the pairs it was fitted on,
    ``heldout_report`` on held-out pairs (None when none were given)."""

    calibration: Calibration
    fit_report: ReliabilityReport
    heldout_report: ReliabilityReport | None = None

    @property
    def report(self) -> ReliabilityReport:
        """The held-out report when there is one, else the in-sample one."""
        return self.heldout_report or self.fit_report


def fit_calibration(
    same_identity: Sequence[float] | np.ndarray,
    near_identity: Sequence[float] | np.ndarray,
    *,
    data: str,
    split: str | None = None,
    heldout: tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray] | None = None,
    heldout_split: str | None = None,
    ridge: float = DEFAULT_RIDGE,
    extra: Mapping[str, Any] | None = None,
) -> CalibrationFit:
    """Fit the curve on one set of pairs, check it there and on ``heldout`` pairs, and record
    the provenance (data, split, pair counts, date, ECE/Brier/accuracies) in the calibration.

    Args:
        same_identity, near_identity: cosines of the pairs to fit on.
        data: what the pairs come from (a dataset root, a CSV, "validation of <run>").
        split: the split fitted on.
        heldout: ``(same, near)`` cosines of held-out pairs to report on.
        heldout_split: their split's name.
        extra: more JSON-ready provenance (e.g. distractor sources).
    """
    source = f"{data}" + (f" [{split}]" if split else "")
    calibration = fit_logistic(same_identity, near_identity, ridge=ridge, source=source)
    fit_report = reliability_report(calibration, same_identity, near_identity)
    heldout_report = reliability_report(calibration, *heldout) if heldout is not None else None
    provenance: dict[str, Any] = {
        "data": data, "split": split,
        "pairs": {"same_identity": calibration.n_same, "near_identity": calibration.n_near},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ridge": ridge,
        "fit_report": _brief(fit_report),
        **dict(extra or {}),
    }
    if heldout_report is not None:
        provenance["heldout_split"] = heldout_split
        provenance["heldout_report"] = _brief(heldout_report)
    calibration = Calibration(midpoint=calibration.midpoint, slope=calibration.slope, source=source,
                              n_same=calibration.n_same, n_near=calibration.n_near, provenance=provenance)
    logger.info("fitted identity-match curve on %s: midpoint %.4f, slope %.2f; in sample: %s", source,
                calibration.midpoint, calibration.slope, fit_report.summary_line())
    if heldout_report is not None:
        logger.info("held out (%s): %s", heldout_split or "held-out pairs", heldout_report.summary_line())
    return CalibrationFit(calibration, fit_report, heldout_report)


def _brief(report: ReliabilityReport) -> dict[str, Any]:
    """The headline statistics (no bins) for metadata."""
    return {k: v for k, v in report.to_dict().items() if k != "bins"}


def pairs_from_dataset(model: Any, samples: Sequence[Any], *, sources: Sequence[str] | None = None,
                       use_masks: bool = False, batch_size: int = 32,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Same-identity and near-identity cosines of ``model`` on NearID samples (through the
    evaluator's :func:`~comfy_nearid.evaluate.similarity_table`). Each sample's view pairs
    are counted once however many distractor sources it has."""
    from .evaluate import embedding_scorer, similarity_table

    scorer = embedding_scorer(model, name="calibration", batch_size=batch_size, use_masks=use_masks)
    table = similarity_table(samples, scorer, sources=sources, progress=progress)
    return pairs_from_table(table)


def reliability_diagram(report: ReliabilityReport, path: str | Path, title: str = "identity match") -> Path:
    """A PNG reliability diagram: observed share of same-identity pairs against the mean
    predicted probability per bin (bar widths = the bins, the diagonal = perfect calibration),
    with the pairs' weight per bin underneath. Needs matplotlib (``pip install matplotlib``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # object API: no pyplot global state
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InvalidInputError(
            "the reliability diagram needs matplotlib: pip install matplotlib (or comfy-nearid[report])"
        ) from e
    fig = Figure(figsize=(4.6, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    top = fig.add_axes((0.14, 0.36, 0.82, 0.52))
    bottom = fig.add_axes((0.14, 0.09, 0.82, 0.18), sharex=top)
    width = 1.0 / len(report.bins)
    lo = [b["lo"] for b in report.bins]
    observed = [b["observed"] if b["observed"] is not None else 0.0 for b in report.bins]
    predicted = [b["predicted"] for b in report.bins]
    top.bar(lo, observed, width=width, align="edge", color="#4477aa", edgecolor="white", label="observed share same")
    top.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="perfect calibration")
    pts = [(p, o) for p, o in zip(predicted, observed) if p is not None]
    if pts:
        top.plot(*zip(*pts), "o", color="#cc3311", markersize=4, label="mean predicted vs observed")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("share of same-identity pairs")
    top.legend(loc="upper left", fontsize=7)
    top.set_title(f"{title}\nECE {report.ece:.3f}, Brier {report.brier:.3f}, acc@50 {100 * report.accuracy_at_50:.1f}%",
                  fontsize=9)
    bottom.bar(lo, [b["weight"] for b in report.bins], width=width, align="edge", color="#999999", edgecolor="white")
    bottom.set_ylabel("weight")
    bottom.set_xlabel("predicted probability (match / 100)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
