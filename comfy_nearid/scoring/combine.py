"""Combining the cosines to several references, and the calibrated match of a score."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInputError

if TYPE_CHECKING:
    pass


#: Ways to combine the cosines to several references (computable from the cosines alone).
AGGREGATES = ("mean", "max")
#: Ways to combine several references into one score; ``prototype`` needs the embeddings.
REFERENCE_COMBINATIONS = ("mean", "max", "prototype")
# ============================================================================ scores
def aggregate_cosines(cosines: np.ndarray, how: str = "mean") -> np.ndarray:
    """Combine cosines to several references: ``[N, R]`` -> ``[N]`` by ``mean`` or ``max``.

    ``prototype`` is not computable from the cosines; use :func:`combine_references`.
    """
    if how not in AGGREGATES:
        hint = "; 'prototype' needs the embeddings: use combine_references" if how == "prototype" else ""
        raise InvalidInputError(f"aggregate must be one of {AGGREGATES}, got {how!r}{hint}")
    cos = np.asarray(cosines, dtype=np.float64)
    if cos.ndim != 2 or cos.shape[1] == 0:
        raise InvalidInputError(f"cosines must be [N, R] with R >= 1, got shape {cos.shape}")
    return cos.mean(axis=1) if how == "mean" else cos.max(axis=1)


def _as_embedding_matrix(value: Any, name: str) -> np.ndarray:
    """A numpy array or torch tensor ``[N, D]`` -> float64 numpy (CPU)."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidInputError(f"{name} must be [N, D] embeddings with D >= 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} holds NaN or infinite values")
    return arr


def combine_references(candidate_emb: Any, reference_emb: Any, mode: str = "mean") -> np.ndarray:
    """Identity score of each candidate against a subject's references.

    Args:
        candidate_emb: unit embeddings ``[N, D]`` (numpy or torch).
        reference_emb: unit embeddings ``[R, D]`` of the subject's references, ``R >= 1``.
        mode: ``mean`` of the R cosines, ``max`` (the closest reference), or ``prototype``:
            the cosine to the mean reference embedding re-normalised to unit length (one
            direction for the subject, so an off reference weighs less than with ``mean``).

    Returns:
        float64 ``[N]`` scores in -1..1, in candidate order.
    """
    if mode not in REFERENCE_COMBINATIONS:
        raise InvalidInputError(f"reference combination must be one of {REFERENCE_COMBINATIONS}, got {mode!r}")
    cand = _as_embedding_matrix(candidate_emb, "candidate embeddings")
    refs = _as_embedding_matrix(reference_emb, "reference embeddings")
    if refs.shape[0] == 0:
        raise InvalidInputError("reference embeddings: at least one reference is needed, got 0")
    if cand.shape[1] != refs.shape[1]:
        raise InvalidInputError(
            f"candidate embeddings are {cand.shape[1]}-d but reference embeddings {refs.shape[1]}-d; "
            "embed both with the same model"
        )
    if mode == "prototype":
        mean = refs.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if norm == 0.0:  # references that cancel out have no common direction
            raise InvalidInputError("the references' mean embedding is zero; 'prototype' has no direction, use mean")
        return cand @ (mean / norm)
    return aggregate_cosines(cand @ refs.T, mode)


def calibrated_matches(model: Any, scores: np.ndarray) -> np.ndarray:
    """Aggregate cosines -> 0..100 identity match with the model's calibration (head metadata,
    else the documented default; see :mod:`comfy_nearid.calibration`)."""
    from ..calibration import calibration_for

    return np.asarray(calibration_for(model).match(np.asarray(scores, dtype=np.float64)), dtype=np.float64)


def calibration_description(model: Any) -> dict[str, Any]:
    from ..calibration import calibration_for

    return calibration_for(model).to_dict()


