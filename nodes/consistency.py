"""NearID Consistency: is it the same subject in every image of a batch, and which one broke?

A thin adapter over :func:`comfy_nearid.consistency.set_consistency` (no reference image): the
batch's pairwise NearID similarities, the medoid (most representative image), outliers by
similarity to the medoid, and identity groups by average-linkage clustering, with the same
threshold rules as ``nearid consistency``.
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_nearid.calibration import calibration_for
from comfy_nearid.consistency import DEFAULT_OUTLIER_Z, head_calibration, set_consistency
from comfy_nearid.consistency_report import matrix_rgb
from comfy_nearid.errors import InvalidInputError

from . import comfy_compat
from .scoring import (
    DEFAULT_BATCH,
    EMPTY_OUTPUTS,
    _MODEL_INPUT,
    _check_images,
    _check_model,
    _maybe_skip,
    _pick,
    _use_cache_input,
    embed_batch,
    shared_cache,
)

THRESHOLD_RULES = ["auto (head's calibrated 50, else robust z)", "identity match (0-100)", "cosine"]
MATRIX_PREVIEW_SIDE = 384


def _threshold_cosine(model: Any, rule: str, threshold: float) -> float | None:
    """The explicit cosine threshold of the chosen rule (None: the library's default rules)."""
    if rule == THRESHOLD_RULES[0]:
        return None
    if rule == THRESHOLD_RULES[2]:
        return float(threshold)
    if not 0.0 < threshold < 100.0:
        raise InvalidInputError(f"threshold on the identity match must be strictly between 0 and 100, got {threshold}")
    return max(-1.0, min(1.0, calibration_for(model).cosine_for(float(threshold))))


def _preview(result: Any, rule: str) -> str:
    """A Markdown table, one row per image numbered from 1 like the batch's images (the
    ``*_index`` outputs stay 0-based batch indices), with the set's summary above it."""
    def signed(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.4f}"

    match = "" if result.calibrated_match is None else f", calibrated match {result.calibrated_match:.1f}/100"
    lines = [
        f"**NearID consistency** of {result.size} image(s): {result.describe()}",
        "",
        f"mean pairwise cosine {signed(result.mean_pairwise)}, min {signed(result.min_pairwise)}{match}; "
        f"outlier threshold {result.threshold:+.4f} ({result.threshold_rule}; {rule})",
        "",
        "| image | mean to others | to medoid | group (1 = largest) | |",
        "|--:|--:|--:|--:|:--|",
    ]
    outliers = set(result.outliers)
    for i in range(result.size):
        mark = "**medoid**" if i == result.medoid else ("outlier" if i in outliers else "")
        lines.append(f"| {i + 1} | {result.mean_to_others[i]:+.4f} | {result.to_medoid[i]:+.4f} "
                     f"| {int(result.groups[i]) + 1} | {mark} |")
    return "\n".join(lines)


class NearIDConsistency:
    """A batch -> set score, per-image scores, outliers, identity groups, medoid, matrix."""

    DESCRIPTION = (
        "Checks that every image of a batch shows the same subject, without a reference: pairwise "
        "NearID similarities, the most representative image (medoid), outliers (similarity to the "
        "medoid below the threshold) and identity groups (average-linkage clustering at the threshold). "
        "'consistent' is the batch without its outliers (never empty: the medoid is never an outlier)."
    )
    CATEGORY = "NearID/score"
    FUNCTION = "check"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "IMAGE", "FLOAT", "FLOAT", "INT", "INT", "INT", "STRING")
    RETURN_NAMES = ("consistent", "outliers", "medoid", "matrix", "set_score", "scores",
                    "outlier_indices", "group_labels", "medoid_index", "preview")
    OUTPUT_IS_LIST = (False, False, False, False, False, True, True, True, False, False)
    OUTPUT_TOOLTIPS = (
        "The images that are not outliers, in batch order.",
        "The outlier images, in batch order (when none: see empty_outputs).",
        "The most representative image (highest mean similarity to the others).",
        "The pairwise similarity matrix as a heat-map (blue 0, white 0.5, red 1).",
        "Mean pairwise cosine similarity of the batch (1 image: 1).",
        "Each image's mean cosine similarity to the others, in batch order (a list).",
        "Batch indices of the outliers (a list; when none: see empty_outputs).",
        "Identity group of each image, in batch order (a list; 0 = the largest group).",
        "Batch index of the medoid.",
        "Text table of the scores, outliers and groups.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "images": ("IMAGE", {"tooltip": "The batch to check (e.g. generated images of one character)."}),
                "threshold_rule": (THRESHOLD_RULES, {"default": THRESHOLD_RULES[0], "tooltip": "auto: the cosine where the head's fitted calibration gives 50, or without one the robust z-score rule (median/MAD of the similarities to the medoid); or a threshold on the identity match (0-100) or the raw cosine."}),
                "threshold": ("FLOAT", {"default": 50.0, "min": -1.0, "max": 100.0, "step": 0.01, "tooltip": "The threshold when threshold_rule is not auto (identity match 0-100, or cosine -1..1)."}),
                "outlier_z": ("FLOAT", {"default": DEFAULT_OUTLIER_Z, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": "Robust rule (auto without a calibrated head): an image is an outlier when its modified z-score is below minus this."}),
                "empty_outputs": (EMPTY_OUTPUTS, {"default": EMPTY_OUTPUTS[0], "tooltip": "When there is no outlier: skip the nodes connected to 'outliers'/'outlier_indices', or send an empty 0-image batch / empty list."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject mask(s), 1 = subject; same size as the images."}),
                "batch_size": ("INT", {"default": DEFAULT_BATCH, "min": 1, "max": 1024, "tooltip": "Images embedded at once; lower it to save memory."}),
                "use_cache": _use_cache_input(),
            },
        }

    def check(self, nearid_model: Any, images: Any, threshold_rule: str = THRESHOLD_RULES[0], threshold: float = 50.0,
              outlier_z: float = DEFAULT_OUTLIER_Z, empty_outputs: str = EMPTY_OUTPUTS[0], mask: Any = None,
              batch_size: int = DEFAULT_BATCH, use_cache: bool = False) -> dict[str, Any]:
        model = _check_model(nearid_model)
        if threshold_rule not in THRESHOLD_RULES:
            raise InvalidInputError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {threshold_rule!r}")
        if empty_outputs not in EMPTY_OUTPUTS:
            raise InvalidInputError(f"empty_outputs must be one of {EMPTY_OUTPUTS}, got {empty_outputs!r}")
        images = _check_images(images, "images")
        progress = comfy_compat.progress_bar(int(images.shape[0]))
        vectors = embed_batch(model, images, mask, batch_size, progress, "images", shared_cache(use_cache))
        result = set_consistency(vectors, head_calibration(model), _threshold_cosine(model, threshold_rule, threshold),
                                 outlier_z)
        inliers, outliers = result.inliers, list(result.outliers)
        matrix = torch.from_numpy(matrix_rgb(result.matrix, MATRIX_PREVIEW_SIDE)).float().div(255.0)[None]
        set_score = 1.0 if result.mean_pairwise is None else float(result.mean_pairwise)
        scores = [float(x) for x in result.mean_to_others]
        groups = [int(g) for g in result.groups]
        preview = _preview(result, threshold_rule)
        skip = empty_outputs == EMPTY_OUTPUTS[0]
        return {
            "ui": {"text": [preview], "nearid_set_score": [set_score], "nearid_scores": scores,
                   "nearid_to_medoid": [float(x) for x in result.to_medoid], "nearid_outliers": outliers,
                   "nearid_groups": groups, "nearid_medoid": [result.medoid],
                   "nearid_threshold": [float(result.threshold)]},
            "result": (
                _pick(images, inliers),
                _maybe_skip(_pick(images, outliers), not outliers and skip),
                images[result.medoid : result.medoid + 1],
                matrix,
                set_score,
                scores,
                _maybe_skip(outliers, not outliers and skip),
                groups,
                result.medoid,
                preview,
            ),
        }


NODE_CLASS_MAPPINGS = {"NearIDConsistency": NearIDConsistency}
NODE_DISPLAY_NAME_MAPPINGS = {"NearIDConsistency": "NearID Consistency"}
