"""MTG (part-level) metrics: SSR / PA with two views, the area oracle, MO and MOpair.

PROTOCOL.md section 4: each MTG sample has two views ``1, 2`` and, for each, a copy with one
part edited (``1p``, ``2p``). Margins ``s(1,2) - s(1,1p)`` and ``s(1,2) - s(2,2p)``. The oracle
for an edited image is ``1 - part_area / object_area``: the larger the edited part, the less
the identity should be preserved. MO = Fisher-z mean of the Pearson r of
``(s(1,1p), oracle_1)``, ``(s(2,2p), oracle_2)``, ``(s(1,2p), oracle_2)``, ``(s(2,1p), oracle_1)``;
MOpair = Fisher-z mean of the first two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from .correlation import fisher_z_mean, pearson_r
from .ssr import SSRStats, ssr_stats

__all__ = ["MTG_FISHER_CLIP", "MTGAlignment", "mtg_alignment", "mtg_margins", "mtg_oracle", "mtg_ssr"]

logger = logging.getLogger(__name__)

MTG_FISHER_CLIP = 0.999


def mtg_oracle(part_area: np.ndarray, object_area: np.ndarray) -> np.ndarray:
    """Oracle identity preservation of an edited image: ``1 - part_area / object_area``.

    Args:
        part_area: ``[N]`` pixel counts (or fractions) of the edited part, >= 0.
        object_area: ``[N]`` pixel counts (same unit) of the whole object, > 0.

    Returns:
        ``[N]`` float64 oracle values (1 = nothing edited, 0 = the whole object edited).
    """
    part = np.asarray(part_area, dtype=np.float64)
    obj = np.asarray(object_area, dtype=np.float64)
    if part.shape != obj.shape:
        raise InvalidInputError(f"part_area {part.shape} and object_area {obj.shape} differ in shape")
    bad = np.flatnonzero(~(obj > 0))
    if bad.size:
        raise InvalidInputError(
            f"object_area must be > 0 (an empty object mask has no oracle); "
            f"index {int(bad[0])} has {obj.reshape(-1)[bad[0]]}"
        )
    if (part < 0).any():
        raise InvalidInputError("part_area must be >= 0")
    return 1.0 - part / obj


def mtg_margins(s_12: np.ndarray, s_1_1p: np.ndarray, s_2_2p: np.ndarray) -> np.ndarray:
    """``[S, 2]`` margins ``s(1,2) - s(1,1p)`` and ``s(1,2) - s(2,2p)`` (NaN = not a trial)."""
    s_12 = np.asarray(s_12, dtype=np.float64)
    return np.stack(
        [s_12 - np.asarray(s_1_1p, dtype=np.float64), s_12 - np.asarray(s_2_2p, dtype=np.float64)],
        axis=1,
    )


def mtg_ssr(s_12: np.ndarray, s_1_1p: np.ndarray, s_2_2p: np.ndarray) -> SSRStats:
    """MTG SSR / PA (percent): the NearID protocol with two views and the edited copies as distractors."""
    return ssr_stats(mtg_margins(s_12, s_1_1p, s_2_2p))


@dataclass(frozen=True)
class MTGAlignment:
    """Oracle alignment of a scorer on MTG.

    Attributes:
        mo: Fisher-z mean of the four Pearson r (NaN if any r is undefined).
        mopair: Fisher-z mean of the two same-view r (``1,1p`` and ``2,2p``).
        r: the four correlations, keys ``"1_1p"``, ``"2_2p"``, ``"1_2p"``, ``"2_1p"``.
        n_samples: samples with all similarities and oracles finite (the ones correlated).
    """

    mo: float
    mopair: float
    r: dict[str, float]
    n_samples: int


def mtg_alignment(
    s_1_1p: np.ndarray,
    s_2_2p: np.ndarray,
    s_1_2p: np.ndarray,
    s_2_1p: np.ndarray,
    oracle_1: np.ndarray,
    oracle_2: np.ndarray,
) -> MTGAlignment:
    """MO and MOpair of one scorer (all inputs ``[S]``; rows with any NaN are left out)."""
    cols = [np.asarray(a, dtype=np.float64).reshape(-1) for a in (s_1_1p, s_2_2p, s_1_2p, s_2_1p, oracle_1, oracle_2)]
    sizes = {c.size for c in cols}
    if len(sizes) != 1:
        raise InvalidInputError(f"MTG inputs differ in length: {[c.size for c in cols]}")
    finite = np.logical_and.reduce([np.isfinite(c) for c in cols])
    if not finite.all():
        logger.info("MTG alignment: %d of %d samples have a missing value and are left out",
                    int((~finite).sum()), finite.size)
    a11, a22, a12, a21, o1, o2 = (c[finite] for c in cols)
    r = {
        "1_1p": pearson_r(a11, o1, what="MTG r(s(1,1p), oracle_1)"),
        "2_2p": pearson_r(a22, o2, what="MTG r(s(2,2p), oracle_2)"),
        "1_2p": pearson_r(a12, o2, what="MTG r(s(1,2p), oracle_2)"),
        "2_1p": pearson_r(a21, o1, what="MTG r(s(2,1p), oracle_1)"),
    }
    mo = fisher_z_mean(r.values(), clip=MTG_FISHER_CLIP)
    mopair = fisher_z_mean([r["1_1p"], r["2_2p"]], clip=MTG_FISHER_CLIP)
    return MTGAlignment(mo=mo, mopair=mopair, r=r, n_samples=int(finite.sum()))
