"""Pure numpy (float64) evaluation metrics: NearID SSR/PA, MTG, DreamBench++ human alignment.

No model and no torch needed: every function here takes similarities or scores as arrays.
"""

from __future__ import annotations

from .correlation import fisher_z_mean, pearson_r
from .human import (
    bundled_dreambench_ratings,
    human_alignment,
    load_human_ratings,
    normalize_metric_key,
    parse_categories,
)
from .mtg import MTGAlignment, mtg_alignment, mtg_margins, mtg_oracle, mtg_ssr
from .ssr import (
    MARGIN_SLOTS,
    SSRStats,
    bootstrap_ci,
    grouped_stats,
    margins_from_similarities,
    pool_stats,
    sample_outcomes,
    ssr_stats,
)
from .table import SimilarityTable, read_similarity_csv, write_similarity_csv

__all__ = [
    "MARGIN_SLOTS",
    "MTGAlignment",
    "SSRStats",
    "SimilarityTable",
    "bootstrap_ci",
    "fisher_z_mean",
    "grouped_stats",
    "human_alignment",
    "load_human_ratings",
    "margins_from_similarities",
    "mtg_alignment",
    "mtg_margins",
    "mtg_oracle",
    "mtg_ssr",
    "normalize_metric_key",
    "parse_categories",
    "pearson_r",
    "pool_stats",
    "read_similarity_csv",
    "sample_outcomes",
    "ssr_stats",
    "write_similarity_csv",
]
