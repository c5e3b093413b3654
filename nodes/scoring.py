"""NearID Embed, Identity Score, Rerank and Filter: thin adapters over ``comfy_nearid``.

Every score is the cosine similarity of NearID embeddings (``IdentityModel.embed``) between a
candidate and the reference(s); several references are combined by ``mean`` (mean of the
similarities, default), ``max`` (the most similar reference) or ``prototype`` (similarity to
the re-normalised mean reference embedding), all by :func:`comfy_nearid.scoring.combine_references`.
The 0..100 identity match comes from :mod:`comfy_nearid.calibration`: the head's fitted curve
(the probability, at equal priors, of the same subject rather than a near-identity look-alike),
else the default curve, which every preview then calls "uncalibrated". With ``use_cache`` on, embeddings go through the
shared :mod:`comfy_nearid.embedding_cache` file (keyed by the model and the pixel content), so
images already embedded, by a node or by ``nearid score``/``eval``, are not embedded again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comfy_nearid import IdentityModel
from comfy_nearid.calibration import calibration_for
from comfy_nearid.embedding_cache import EmbeddingCache, cached_embed, default_cache_path
from comfy_nearid.errors import InvalidInputError
from comfy_nearid.scoring import REFERENCE_COMBINATIONS, combine_references

from . import comfy_compat
from .loader import MODEL_TYPE

EMBEDDING_TYPE = "NEARID_EMBEDDING"
COMBINE_MODES = list(REFERENCE_COMBINATIONS)
THRESHOLD_SCALES = ["identity match (0-100)", "cosine"]
WHEN_NONE_PASS = ["pass nothing", "keep best"]
EMPTY_OUTPUTS = ["skip downstream nodes", "empty batch"]
DEFAULT_BATCH = 16


@dataclass(frozen=True)
class NearIDEmbedding:
    """Embeddings passed between nodes: ``vectors`` float32 ``[N, D]`` (CPU, unit length)
    and the identity of the model that made them, so vectors of two models never mix."""

    vectors: Any
    model_identity: str

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


# ----------------------------------------------------------------------------- helpers
_CACHES: dict[Path, EmbeddingCache] = {}
_CACHES_LOCK = threading.Lock()


def shared_cache(enabled: bool) -> EmbeddingCache | None:
    """The embedding cache at :func:`default_cache_path` (opened once per path and kept open
    for the life of the ComfyUI process), or None when ``enabled`` is False."""
    if not enabled:
        return None
    path = default_cache_path()
    with _CACHES_LOCK:
        cache = _CACHES.get(path)
        if cache is None:
            cache = _CACHES[path] = EmbeddingCache(path)
        return cache


def _check_images(images: Any, name: str) -> Any:
    """A ComfyUI IMAGE: float tensor ``[B, H, W, C]`` with ``B >= 1``."""
    if not isinstance(images, torch.Tensor):
        raise InvalidInputError(f"{name}: expected an IMAGE tensor [B,H,W,C], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InvalidInputError(f"{name}: expected an IMAGE tensor [B,H,W,C], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise InvalidInputError(f"{name}: the image batch is empty (0 images); connect at least one image")
    return images


def _check_mask(mask: Any, images: Any, name: str, images_name: str) -> Any:
    """A ComfyUI MASK ``[B,H,W]`` (or ``[H,W]``) matching the images' size; B is 1 or theirs."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InvalidInputError(f"{name}: expected a MASK tensor [B,H,W], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise InvalidInputError(f"{name}: expected a MASK tensor [B,H,W], got shape {tuple(mask.shape)}")
    b, h, w = images.shape[:3]
    if tuple(mask.shape[1:]) != (h, w):
        raise InvalidInputError(
            f"{name}: mask size {mask.shape[2]}x{mask.shape[1]} (WxH) does not match the {images_name} "
            f"size {w}x{h}; resize the mask to the image (e.g. with a mask resize node)"
        )
    if mask.shape[0] not in (1, b):
        raise InvalidInputError(
            f"{name}: {mask.shape[0]} masks for {b} {images_name}; give one mask per image or a single mask"
        )
    return mask


def embed_batch(model: Any, images: Any, mask: Any = None, batch_size: int = DEFAULT_BATCH,
                progress: Any = None, name: str = "images", cache: EmbeddingCache | None = None) -> Any:
    """``model.embed`` over ``images`` in chunks of ``batch_size`` (through ``cache`` when
    given: see :func:`comfy_nearid.embedding_cache.cached_embed`), reporting progress to
    ComfyUI and stopping at Cancel between chunks. Returns float32 ``[B, D]`` (CPU)."""
    images = _check_images(images, name)
    mask = _check_mask(mask, images, f"{name} mask", name)
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, images.shape[0], batch_size):
        comfy_compat.check_interrupted()
        chunk = images[start : start + batch_size]
        chunk_mask = None
        if mask is not None:
            chunk_mask = mask if mask.shape[0] == 1 else mask[start : start + batch_size]
            if chunk_mask.shape[0] == 1 and chunk.shape[0] > 1:
                chunk_mask = chunk_mask.expand(chunk.shape[0], -1, -1)
        out.append(cached_embed(model, chunk, cache, masks=chunk_mask, batch_size=batch_size))
        if progress is not None:
            progress.update(int(chunk.shape[0]))
    comfy_compat.check_interrupted()
    return torch.cat(out)


def _check_model(model: Any) -> Any:
    if not isinstance(model, IdentityModel):
        raise InvalidInputError(
            f"nearid_model: expected a NEARID_MODEL from 'Load NearID Model', got {type(model).__name__}"
        )
    return model


@dataclass
class ScoreResult:
    """Scores of N candidates in input order."""

    cosine: list[float]
    match: list[float]
    combine: str
    n_references: int
    calibrated: bool = False  # the match comes from a curve fitted for this head

    @property
    def best_index(self) -> int:
        return max(range(len(self.cosine)), key=lambda i: (self.cosine[i], -i))


def score_candidates(
    model: Any,
    candidates: Any,
    reference: Any = None,
    reference_mask: Any = None,
    candidate_mask: Any = None,
    reference_embedding: NearIDEmbedding | None = None,
    combine: str = "mean",
    batch_size: int = DEFAULT_BATCH,
    use_cache: bool = False,
) -> ScoreResult:
    """Embed references and candidates (through the shared embedding cache when ``use_cache``)
    and score each candidate (see module docstring)."""
    model = _check_model(model)
    if combine not in COMBINE_MODES:
        raise InvalidInputError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if reference is None and reference_embedding is None:
        raise InvalidInputError("connect a reference IMAGE or a reference_embedding (from NearID Embed)")
    candidates = _check_images(candidates, "candidates")
    n_ref_images = 0 if reference is None else int(_check_images(reference, "reference").shape[0])
    progress = comfy_compat.progress_bar(n_ref_images + int(candidates.shape[0]))
    cache = shared_cache(use_cache)
    refs = []
    if reference_embedding is not None:
        if not isinstance(reference_embedding, NearIDEmbedding):
            raise InvalidInputError(
                f"reference_embedding: expected a NEARID_EMBEDDING, got {type(reference_embedding).__name__}"
            )
        if reference_embedding.model_identity != model.identity:
            raise InvalidInputError(
                "reference_embedding was made by a different NearID model "
                f"({reference_embedding.model_identity}) than this one ({model.identity}); "
                "embed the references with the same Load NearID Model output"
            )
        refs.append(reference_embedding.vectors)
    if reference is not None:
        refs.append(embed_batch(model, reference, reference_mask, batch_size, progress, "reference", cache))
    cand = embed_batch(model, candidates, candidate_mask, batch_size, progress, "candidates", cache)
    ref = torch.cat(refs)
    # float32, the embeddings' precision: the digits past it are batch-position noise (equal
    # images in one batch differ by ~1e-8), which should not reorder equal candidates in Rerank
    cosine = combine_references(cand, ref, combine).astype(np.float32)
    curve = calibration_for(model)
    match = curve.match(cosine.astype(np.float64))
    return ScoreResult([float(x) for x in cosine], [float(x) for x in match], combine, int(ref.shape[0]),
                       curve.fitted)


def match_note(calibrated: bool) -> str:
    """What the 0..100 match of a preview means, calibrated or not."""
    if calibrated:
        return ("match: calibrated (the head's fitted curve: the probability, at equal priors, of the same "
                "subject rather than a near-identity look-alike)")
    return ("match: uncalibrated (this head has no fitted curve; the default curve, cosine 0.5 -> 50, is not a "
            "probability; fit one with `nearid calibrate`)")


def format_scores(result: ScoreResult, order: list[int] | None = None, marks: dict[int, str] | None = None) -> str:
    """One line per candidate: index, cosine, 0..100 match (and a mark such as 'best')."""
    order = list(range(len(result.cosine))) if order is None else order
    marks = marks or {}
    lines = [f"NearID identity ({result.combine} over {result.n_references} reference(s)); "
             + match_note(result.calibrated) + ":"]
    for i in order:
        mark = f"  {marks[i]}" if i in marks else ""
        lines.append(f"#{i}: cosine {result.cosine[i]:+.4f}  match {result.match[i]:5.1f}/100{mark}")
    return "\n".join(lines)


def _ui(result: ScoreResult, preview: str, **extra: list[Any]) -> dict[str, list[Any]]:
    ui: dict[str, list[Any]] = {
        "text": [preview],
        "nearid_scores": list(result.cosine),
        "nearid_match": list(result.match),
        "nearid_calibrated": [result.calibrated],
    }
    ui.update(extra)
    return ui


def _reference_inputs() -> dict[str, Any]:
    return {
        "reference": ("IMAGE", {"tooltip": "Reference image(s) of the subject; several are combined (see combine)."}),
        "reference_mask": ("MASK", {"tooltip": "Optional subject mask of the reference(s), 1 = subject; same size as the reference images."}),
        "candidate_mask": ("MASK", {"tooltip": "Optional subject mask of the candidates, 1 = subject; same size as the candidates."}),
        "reference_embedding": (EMBEDDING_TYPE, {"tooltip": "Reference embeddings from NearID Embed, used with (or instead of) the reference images."}),
        "batch_size": ("INT", {"default": DEFAULT_BATCH, "min": 1, "max": 1024, "tooltip": "Images embedded at once; lower it to save memory."}),
        "use_cache": _use_cache_input(),
    }


def _use_cache_input() -> tuple[str, dict[str, Any]]:
    return ("BOOLEAN", {
        "default": False,
        "tooltip": (
            f"Keep embeddings in the NearID embedding cache file ({default_cache_path()}; set the "
            "NEARID_EMBEDDING_CACHE environment variable to move it), shared with `nearid score` "
            "and `nearid eval`: an image already embedded by this model (same pixels, same mask) "
            "is not embedded again."
        ),
    })


_MODEL_INPUT = (MODEL_TYPE, {"tooltip": "The model from Load NearID Model."})
_CANDIDATES_INPUT = ("IMAGE", {"tooltip": "Candidate images (e.g. a generated batch) to score against the reference."})
_COMBINE_INPUT = (COMBINE_MODES, {
    "default": "mean",
    "tooltip": "How several references combine: mean of the similarities, max (closest reference) or prototype (similarity to the mean reference embedding).",
})


# ----------------------------------------------------------------------------- nodes
class NearIDEmbed:
    """Images (+ optional subject masks) -> NearID embeddings."""

    DESCRIPTION = "Computes NearID identity embeddings (unit vectors) of an image batch, e.g. to reuse reference embeddings across nodes."
    CATEGORY = "NearID/score"
    FUNCTION = "embed"
    RETURN_TYPES = (EMBEDDING_TYPE, "INT")
    RETURN_NAMES = ("embedding", "count")
    OUTPUT_TOOLTIPS = ("NearID embeddings of the images, in batch order.", "Number of embedded images.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "images": ("IMAGE", {"tooltip": "Images to embed."}),
                "batch_size": ("INT", {"default": DEFAULT_BATCH, "min": 1, "max": 1024, "tooltip": "Images embedded at once; lower it to save memory."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject mask(s), 1 = subject; same size as the images. The embedding then looks only at the subject."}),
                "use_cache": _use_cache_input(),
            },
        }

    def embed(self, nearid_model: Any, images: Any, batch_size: int = DEFAULT_BATCH, mask: Any = None,
              use_cache: bool = False) -> tuple[Any, int]:
        model = _check_model(nearid_model)
        progress = comfy_compat.progress_bar(int(_check_images(images, "images").shape[0]))
        vectors = embed_batch(model, images, mask, batch_size, progress, "images", shared_cache(use_cache))
        return (NearIDEmbedding(vectors, model.identity), int(vectors.shape[0]))


class NearIDIdentityScore:
    """Score every candidate against the reference(s)."""

    DESCRIPTION = (
        "Scores how well each candidate preserves the reference subject's identity: the raw cosine "
        "similarity of NearID embeddings and a 0-100 identity match (calibrated when the head carries a "
        "fitted curve; the preview says which)."
    )
    CATEGORY = "NearID/score"
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING", "FLOAT", "FLOAT", "INT")
    RETURN_NAMES = ("scores", "matches", "preview", "best_score", "best_match", "best_index")
    OUTPUT_IS_LIST = (True, True, False, False, False, False)
    OUTPUT_TOOLTIPS = (
        "Cosine similarity (-1..1) of each candidate, in input order (a list).",
        "Identity match (0..100) of each candidate, in input order (a list); calibrated only when the head carries a fitted curve (see the preview).",
        "Text table of the scores.",
        "Highest cosine similarity.",
        "Identity match of the best candidate (0..100).",
        "Batch index of the best candidate.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"nearid_model": _MODEL_INPUT, "candidates": _CANDIDATES_INPUT, "combine": _COMBINE_INPUT},
            "optional": _reference_inputs(),
        }

    def score(self, nearid_model: Any, candidates: Any, combine: str = "mean", reference: Any = None,
              reference_mask: Any = None, candidate_mask: Any = None, reference_embedding: Any = None,
              batch_size: int = DEFAULT_BATCH, use_cache: bool = False) -> dict[str, Any]:
        result = score_candidates(nearid_model, candidates, reference, reference_mask, candidate_mask,
                                  reference_embedding, combine, batch_size, use_cache)
        best = result.best_index
        preview = format_scores(result, marks={best: "<- best"})
        return {
            "ui": _ui(result, preview, nearid_best=[best]),
            "result": (result.cosine, result.match, preview, result.cosine[best], result.match[best], best),
        }


def _reorder_latent(latent: Any, indices: list[int], count: int) -> Any:
    """Reorder a LATENT dict's batch (samples, batch_index, batch-sized noise_mask)."""
    if latent is None:
        return None
    if not isinstance(latent, dict) or "samples" not in latent:
        raise InvalidInputError(f"latent: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    samples = latent["samples"]
    if samples.shape[0] != count:
        raise InvalidInputError(
            f"latent: its batch has {samples.shape[0]} latents but there are {count} candidates; "
            "connect the latents the candidates were decoded from"
        )
    idx = torch.tensor(indices, dtype=torch.long)
    out = dict(latent)
    out["samples"] = samples[idx]
    if "batch_index" in latent and len(latent["batch_index"]) == count:
        out["batch_index"] = [latent["batch_index"][i] for i in indices]
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] == count:
        out["noise_mask"] = mask[idx]
    return out


def _select_mask(mask: Any, candidates: Any, indices: list[int]) -> Any:
    """The candidates' masks in the given order (all-ones when no mask was given)."""
    b, h, w = candidates.shape[:3]
    if mask is None:
        return torch.ones((len(indices), h, w), dtype=torch.float32)
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.shape[0] == 1 and b > 1:
        mask = mask.expand(b, -1, -1)
    return mask[torch.tensor(indices, dtype=torch.long)] if indices else mask[:0]


class NearIDRerank:
    """Sort candidates by identity score and keep the top k."""

    DESCRIPTION = (
        "Sorts candidates by NearID identity score (best first) and keeps the top k; the latents "
        "and masks connected alongside follow the same order."
    )
    CATEGORY = "NearID/score"
    FUNCTION = "rerank"
    RETURN_TYPES = ("IMAGE", "LATENT", "MASK", "FLOAT", "INT", "STRING")
    RETURN_NAMES = ("images", "latent", "mask", "scores", "indices", "preview")
    OUTPUT_IS_LIST = (False, False, False, True, True, False)
    OUTPUT_TOOLTIPS = (
        "The top-k candidates, best first.",
        "The connected latents in the same order (None when no latent is connected).",
        "The candidate masks in the same order (all ones when no mask is connected).",
        "Cosine similarity of each kept candidate, best first (a list).",
        "Original batch index of each kept candidate, best first (a list).",
        "Text table of the ranking.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        optional = _reference_inputs()
        optional["latent"] = ("LATENT", {"tooltip": "Optional latents of the candidates (same batch order), reordered alongside."})
        # the cache switch after the latent socket: older saved workflows, which have no value
        # for it, still map every input
        optional["use_cache"] = optional.pop("use_cache")
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "candidates": _CANDIDATES_INPUT,
                "top_k": ("INT", {"default": 1, "min": 0, "max": 4096, "tooltip": "How many candidates to keep; 0 keeps all (sorted)."}),
                "combine": _COMBINE_INPUT,
            },
            "optional": optional,
        }

    def rerank(self, nearid_model: Any, candidates: Any, top_k: int = 1, combine: str = "mean", reference: Any = None,
               reference_mask: Any = None, candidate_mask: Any = None, reference_embedding: Any = None,
               batch_size: int = DEFAULT_BATCH, latent: Any = None, use_cache: bool = False) -> dict[str, Any]:
        if top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0 (0 = all), got {top_k}")
        result = score_candidates(nearid_model, candidates, reference, reference_mask, candidate_mask,
                                  reference_embedding, combine, batch_size, use_cache)
        n = len(result.cosine)
        # Stable: equal scores keep their batch order.
        order = sorted(range(n), key=lambda i: -result.cosine[i])
        keep = order[: (top_k or n)]
        idx = torch.tensor(keep, dtype=torch.long)
        marks = {i: f"rank {r + 1}" + ("" if r < len(keep) else " (dropped)") for r, i in enumerate(order)}
        preview = format_scores(result, order=order, marks=marks)
        return {
            "ui": _ui(result, preview, nearid_order=keep),
            "result": (
                candidates[idx],
                _reorder_latent(latent, keep, n),
                _select_mask(candidate_mask, candidates, keep),
                [result.cosine[i] for i in keep],
                keep,
                preview,
            ),
        }


def _pick(images: Any, indices: list[int]) -> Any:
    """``images[indices]``; an empty list gives an empty batch ``[0, H, W, C]`` (a valid IMAGE)."""
    return images[torch.tensor(indices, dtype=torch.long)] if indices else images[:0]


def _maybe_skip(value: Any, skip: bool) -> Any:
    """``value``, or ComfyUI's marker that silently skips the nodes fed by this output."""
    return comfy_compat.skip_downstream(value) if skip else value


class NearIDFilter:
    """Split candidates into passed / rejected by an identity threshold."""

    DESCRIPTION = (
        "Keeps the candidates whose identity score reaches the threshold and routes the others to "
        "'rejected'. When none passes, 'passed' is empty or holds the single best candidate. An "
        "empty output either silently skips the nodes fed by it (so Preview/Save Image, which "
        "cannot take an empty batch, do not fail) or is a real 0-image batch."
    )
    CATEGORY = "NearID/score"
    FUNCTION = "filter"
    RETURN_TYPES = ("IMAGE", "IMAGE", "INT", "INT", "FLOAT", "INT", "STRING")
    RETURN_NAMES = ("passed", "rejected", "passed_indices", "rejected_indices", "scores", "passed_count", "preview")
    OUTPUT_IS_LIST = (False, False, True, True, True, False, False)
    OUTPUT_TOOLTIPS = (
        "Candidates at or above the threshold, in batch order (when none: see empty_outputs).",
        "Candidates below the threshold, in batch order (when none: see empty_outputs).",
        "Batch indices of the passed candidates (a list; when none: see empty_outputs).",
        "Batch indices of the rejected candidates (a list; when none: see empty_outputs).",
        "Cosine similarity of every candidate, in batch order (a list).",
        "Number of passed candidates.",
        "Text table of the scores and the decision.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "candidates": _CANDIDATES_INPUT,
                "threshold": ("FLOAT", {"default": 50.0, "min": -1.0, "max": 100.0, "step": 0.01, "tooltip": "A candidate passes when its score is at least this (on the scale chosen in threshold_on)."}),
                "threshold_on": (THRESHOLD_SCALES, {"default": THRESHOLD_SCALES[0], "tooltip": "Compare the threshold with the identity match (0..100) or the raw cosine (-1..1). With a calibrated head the match is the probability in percent, at equal priors, of the same subject rather than a near-identity look-alike, so 50 means 'cannot tell'; with an uncalibrated head (the preview says so) it is not a probability."}),
                "when_none_pass": (WHEN_NONE_PASS, {"default": WHEN_NONE_PASS[0], "tooltip": "If no candidate passes: pass nothing, or keep the single best candidate."}),
                "empty_outputs": (EMPTY_OUTPUTS, {"default": EMPTY_OUTPUTS[0], "tooltip": "An output with no image (e.g. 'rejected' when all pass): skip the nodes connected to it, or send an empty 0-image batch / empty list. 'empty batch' only suits nodes that accept one: Preview Image and Save Image cannot take an empty batch and fail on it."}),
                "combine": _COMBINE_INPUT,
            },
            "optional": _reference_inputs(),
        }

    def filter(self, nearid_model: Any, candidates: Any, threshold: float = 50.0,
               threshold_on: str = THRESHOLD_SCALES[0], when_none_pass: str = WHEN_NONE_PASS[0],
               empty_outputs: str = EMPTY_OUTPUTS[0], combine: str = "mean", reference: Any = None, reference_mask: Any = None,
               candidate_mask: Any = None, reference_embedding: Any = None,
               batch_size: int = DEFAULT_BATCH, use_cache: bool = False) -> dict[str, Any]:
        if threshold_on not in THRESHOLD_SCALES:
            raise InvalidInputError(f"threshold_on must be one of {THRESHOLD_SCALES}, got {threshold_on!r}")
        if when_none_pass not in WHEN_NONE_PASS:
            raise InvalidInputError(f"when_none_pass must be one of {WHEN_NONE_PASS}, got {when_none_pass!r}")
        if empty_outputs not in EMPTY_OUTPUTS:
            raise InvalidInputError(f"empty_outputs must be one of {EMPTY_OUTPUTS}, got {empty_outputs!r}")
        result = score_candidates(nearid_model, candidates, reference, reference_mask, candidate_mask,
                                  reference_embedding, combine, batch_size, use_cache)
        values = result.match if threshold_on == THRESHOLD_SCALES[0] else result.cosine
        passed = [i for i, v in enumerate(values) if v >= threshold]
        fallback = False
        if not passed and when_none_pass == WHEN_NONE_PASS[1]:
            passed, fallback = [result.best_index], True
        passed_set = set(passed)
        rejected = [i for i in range(len(values)) if i not in passed_set]
        marks = {i: ("passed (best, fallback)" if fallback else "passed") for i in passed}
        marks.update({i: "rejected" for i in rejected})
        preview = format_scores(result, marks=marks) + f"\nthreshold {threshold:g} on {threshold_on}"
        skip = empty_outputs == EMPTY_OUTPUTS[0]
        empty = [name for name, items in (("passed", passed), ("rejected", rejected)) if not items]
        if not skip:
            preview += ("\nempty outputs: empty batch" + (f" ({' and '.join(empty)} is an empty 0-image batch)" if empty else "")
                        + "; Preview/Save Image nodes cannot take an empty batch (choose 'skip downstream nodes' for them)")
        return {
            "ui": _ui(result, preview, nearid_passed=passed, nearid_rejected=rejected, nearid_fallback=[fallback]),
            "result": (
                _maybe_skip(_pick(candidates, passed), not passed and skip),
                _maybe_skip(_pick(candidates, rejected), not rejected and skip),
                _maybe_skip(passed, not passed and skip),
                _maybe_skip(rejected, not rejected and skip),
                result.cosine,
                len(passed),
                preview,
            ),
        }


NODE_CLASS_MAPPINGS = {
    "NearIDEmbed": NearIDEmbed,
    "NearIDIdentityScore": NearIDIdentityScore,
    "NearIDRerank": NearIDRerank,
    "NearIDFilter": NearIDFilter,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NearIDEmbed": "NearID Embed",
    "NearIDIdentityScore": "NearID Identity Score",
    "NearIDRerank": "NearID Rerank",
    "NearIDFilter": "NearID Filter",
}
