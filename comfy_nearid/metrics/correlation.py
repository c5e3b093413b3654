"""Pearson correlation and Fisher-z averaging shared by the MTG and human-alignment metrics."""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from ..errors import InvalidInputError

__all__ = ["fisher_z_mean", "pearson_r"]

logger = logging.getLogger(__name__)


def pearson_r(x: np.ndarray, y: np.ndarray, *, what: str = "values") -> float:
    """Pearson correlation of two equally long 1-D arrays, in float64.

    Args:
        x, y: ``[N]`` finite values, ``N >= 2``.
        what: a name for the pair, used in error and warning messages.

    Returns:
        r in [-1, 1]; NaN (with a warning) when either side is constant, since r is
        undefined there.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InvalidInputError(f"{what}: lengths differ ({x.size} vs {y.size})")
    if x.size < 2:
        raise InvalidInputError(f"{what}: Pearson r needs at least 2 values, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InvalidInputError(f"{what}: Pearson r needs finite values (found NaN or inf)")
    dx = x - x.mean()
    dy = y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denom == 0.0:
        logger.warning("%s: one side is constant, Pearson r is undefined (NaN)", what)
        return float("nan")
    return float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))


def fisher_z_mean(rs: Iterable[float], clip: float = 0.999) -> float:
    """Average correlations in Fisher-z space: ``tanh(mean(atanh(clip(r, -c, c))))``.

    Args:
        rs: correlations in [-1, 1] (NaN propagates to a NaN mean).
        clip: ``c`` in (0, 1); keeps atanh finite (0.999 for MTG, 0.9999 for DreamBench++).
    """
    values = np.asarray(list(rs), dtype=np.float64)
    if values.size == 0:
        raise InvalidInputError("fisher_z_mean needs at least one correlation, got none")
    if not 0.0 < clip < 1.0:
        raise InvalidInputError(f"clip must be in (0, 1), got {clip}")
    return float(np.tanh(np.mean(np.arctanh(np.clip(values, -clip, clip)))))
