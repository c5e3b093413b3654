"""Scorers: a name plus a function from a batch of images (and masks) to embeddings; the spec parser.

:func:`model_scorer` builds one from a ``head:PATH`` / ``pooled:BACKBONE`` / ``mean:BACKBONE`` spec
or a standard metric's name (``clip-i``, ``dino-i``, ``dino-i-s8``, ``dinov2``: a backbone's own
pooling with its conventional preprocessing, see :func:`~comfy_nearid.backbones.metric_backbones`),
:func:`embedding_scorer` from a model with the shared embedding cache, :func:`feature_scorer` a
hand-made one (``feature:background`` / ``feature:object``) that checks the protocol itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
from PIL import Image

from ..errors import InvalidInputError
from ..masking import MASK_KEEPS, MASK_MODES, MaskKeep, MaskMode

if TYPE_CHECKING:
    from ..embedding_cache import EmbeddingCache
    from ..model import IdentityModel

logger = logging.getLogger(__name__)

Benchmark = Literal["ssr", "mtg"]
# (PIL RGB images, masks in mode "L" or None per image; None for the list when masks are off)
# -> [N, D] embeddings (torch tensor or numpy array); cosine similarity is taken afterwards.
EmbedFn = Callable[[list[Image.Image], "list[Image.Image | None] | None"], Any]


@dataclass
class Scorer:
    """A named embedding function evaluated by :func:`evaluate_dataset`.

    Attributes:
        name: row label in tables and reports.
        embed_fn: see :data:`EmbedFn`.
        use_masks: use object masks (each image's own; a distractor without one takes its
            view's mask; an image without any mask is used whole).
        batch_size: images per ``embed_fn`` call.
        identity: provenance string (model identity, feature name) recorded in the summary.
        cache_path: the embedding cache file the scorer reads and fills, or ``None``.
        mask_mode: ``"attention"`` passes the masks to ``embed_fn`` (the model restricts its
            attention pooling to them); ``"pixels"`` passes the reference's masked copies of
            the images (:func:`~comfy_nearid.masking.apply_pixel_mask`) and no masks.
        mask_keep: with ``"pixels"``: ``"foreground"`` blackens outside the mask,
            ``"background"`` inside it (a context-only probe).
        cores: above 1, ``embed_fn`` is thread-safe and computes on the CPU: this many
            batches are decoded and embedded side by side, torch on one thread each
            (:func:`~comfy_nearid.prefetch.batches_on_cores`); 1 (default): the next batches
            are decoded in threads while ``embed_fn`` runs.
    """

    name: str
    embed_fn: EmbedFn
    use_masks: bool = False
    batch_size: int = 32
    identity: str = ""
    cache_path: str | None = None
    mask_mode: MaskMode = "attention"
    mask_keep: MaskKeep = "foreground"
    cores: int = 1

    def __post_init__(self) -> None:
        check_mask_options(self.mask_mode, self.mask_keep)
        if self.cores < 1:
            raise InvalidInputError(f"scorer {self.name!r}: cores must be >= 1, got {self.cores}")


def check_mask_options(mask_mode: str, mask_keep: str) -> None:
    """Reject an unknown mask mode / keep, and ``keep="background"`` outside pixel masking."""
    if mask_mode not in MASK_MODES:
        raise InvalidInputError(f"mask mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if mask_keep not in MASK_KEEPS:
        raise InvalidInputError(f"mask keep must be one of {MASK_KEEPS}, got {mask_keep!r}")
    if mask_keep == "background" and mask_mode != "pixels":
        raise InvalidInputError("mask keep 'background' applies to pixel masking only (masks 'pixels')")


# --------------------------------------------------------------------------- planning


# --------------------------------------------------------------------------- scorers


def parse_scorer_spec(spec: str) -> tuple[str, str]:
    """``"KIND:ARG"`` -> ``(kind, arg)``; kinds: head, pooled, mean, feature. A standard
    metric's name (``clip-i``, ``dino-i``, ...) is ``("pooled", its backbone)``."""
    kind, sep, arg = spec.partition(":")
    if not sep:
        from ..backbones import metric_backbones  # lazy: specs with a kind need no torch

        metrics = metric_backbones()
        if spec in metrics:
            return "pooled", metrics[spec]
        raise InvalidInputError(
            f"scorer spec {spec!r}: expected a metric name ({', '.join(sorted(metrics))}), head:PATH.safetensors, "
            "pooled:BACKBONE, mean:BACKBONE or feature:background|object"
        )
    if not arg or kind not in ("head", "pooled", "mean", "feature"):
        raise InvalidInputError(
            f"scorer spec {spec!r}: expected a metric name (clip-i, dino-i, ...), head:PATH.safetensors, "
            "pooled:BACKBONE, mean:BACKBONE or feature:background|object"
        )
    return kind, arg


def scorer_model(
    spec: str,
    *,
    device: str | None = None,
    dtype: str = "auto",
    pretrained: bool = True,
    seed: int = 0,
) -> "IdentityModel":
    """The :class:`~comfy_nearid.model.IdentityModel` of a model scorer spec (not ``feature:``),
    through :func:`comfy_nearid.load_model`; pretrained weights are looked up on disk, never
    downloaded unless allowed (see :mod:`comfy_nearid.weights`)."""
    kind, arg = parse_scorer_spec(spec)
    if kind == "feature":
        raise InvalidInputError(f"scorer spec {spec!r} is a feature scorer, not a model")
    from .. import load_model  # lazy: the CSV path and `nearid eval human` need no torch

    if kind == "head":
        return load_model(head=arg, device=device, dtype=dtype, pretrained=pretrained, seed=seed)
    return load_model(backbone=arg, readout=kind, device=device, dtype=dtype, pretrained=pretrained, seed=seed)


def model_scorer(
    spec: str,
    *,
    name: str | None = None,
    device: str | None = None,
    batch_size: int = 32,
    use_masks: bool = False,
    pretrained: bool = True,
    cache: "EmbeddingCache | None" = None,
    mask_mode: MaskMode = "attention",
    mask_keep: MaskKeep = "foreground",
) -> Scorer:
    """Build a :class:`Scorer` from a spec through :func:`comfy_nearid.load_model`.

    ``head:PATH`` = a NearID head file (its backbone from the metadata); ``pooled:BACKBONE``
    = the frozen backbone read out through its own pooling (SigLIP's MAP head, CLIP's image
    embedding, DINO's CLS token); a metric name (``clip-i``, ``dino-i``, ``dinov2``) = the
    ``pooled`` readout of its backbone;
    ``mean:BACKBONE`` = the backbone's mean-pooled tokens; ``feature:...`` =
    :func:`feature_scorer` (cheap, never cached). ``pretrained=False`` builds random weights
    (tests, benchmarks). ``cache``: see :func:`embedding_scorer`; ``use_masks``,
    ``mask_mode``, ``mask_keep``: see :class:`Scorer` (feature scorers always read the raw
    masks to select their region, so the mask options do not apply to them).
    """
    kind, arg = parse_scorer_spec(spec)
    check_mask_options(mask_mode, mask_keep)
    if kind == "feature":
        return feature_scorer(arg, name=name or spec, batch_size=batch_size)
    model = scorer_model(spec, device=device, pretrained=pretrained)
    return embedding_scorer(model, name=name or spec, batch_size=batch_size, use_masks=use_masks, cache=cache,
                            mask_mode=mask_mode, mask_keep=mask_keep)


def embedding_scorer(
    model: "IdentityModel",
    *,
    name: str,
    batch_size: int = 32,
    use_masks: bool = False,
    cache: "EmbeddingCache | None" = None,
    mask_mode: MaskMode = "attention",
    mask_keep: MaskKeep = "foreground",
) -> Scorer:
    """A :class:`Scorer` over a loaded :class:`~comfy_nearid.model.IdentityModel`.

    With a ``cache``, embeddings go through :func:`~comfy_nearid.embedding_cache.cached_embed`:
    keyed by the model's cache identity and the decoded pixels (plus the mask when masks are
    used), so a second evaluation of the same data with the same model runs no forward pass
    (images are still decoded to compute their keys), and another model never reads these
    entries. Several processes may share one cache file.
    """
    from ..embedding_cache import cached_embed, model_cache_identity

    def embed(images: list[Image.Image], masks: list[Image.Image | None] | None) -> Any:
        if masks is None or all(m is None for m in masks):
            return cached_embed(model, images, cache, masks=None, batch_size=len(images))
        # An image without a mask is embedded whole, exactly as when masks are off, whichever
        # batch it falls in: masked and unmasked images go through the model separately.
        out = np.zeros((len(images), 0), dtype=np.float32)
        for with_mask in (True, False):
            idx = [i for i, m in enumerate(masks) if (m is not None) == with_mask]
            if not idx:
                continue
            part = cached_embed(model, [images[i] for i in idx], cache,
                                masks=[masks[i] for i in idx] if with_mask else None, batch_size=len(idx))
            part = part.detach().cpu().float().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(images), part.shape[1]), dtype=np.float32)
            out[idx] = part
        return out

    return Scorer(name=name, embed_fn=embed, use_masks=use_masks, batch_size=batch_size,
                  identity=model_cache_identity(model), cache_path=None if cache is None else str(cache.path),
                  mask_mode=mask_mode, mask_keep=mask_keep)


# Feature scorers: hand-made embeddings that see only one region of the image. They check
# that the protocol measures what it claims: context-only features must fail on distractors
# that share the exact background, object-only features must succeed.
_HIST_BINS = 8  # per colour channel
_RADIAL_BINS = 12  # shape signature: distances to the centroid / mean distance, over [0, 2.4)


def _region_pixels(image: Image.Image, mask: Image.Image | None, region: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 ``[H, W, 3]``, bool ``[H, W]`` selection of the region) for one image."""
    if mask is None:
        raise InvalidInputError(f"feature scorer ({region}) needs an object mask for every image")
    rgb = np.asarray(image.convert("RGB"))
    subject = np.asarray(mask.convert("L").resize(image.size, Image.NEAREST)) >= 128
    return rgb, (subject if region == "object" else ~subject)


def _colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """L2-normalised joint RGB histogram (``bins^3``) of ``[P, 3]`` uint8 pixels."""
    hist = np.zeros(_HIST_BINS**3, dtype=np.float64)
    if len(pixels):
        q = pixels.astype(np.int64) * _HIST_BINS // 256
        hist += np.bincount((q[:, 0] * _HIST_BINS + q[:, 1]) * _HIST_BINS + q[:, 2], minlength=_HIST_BINS**3)
    else:
        hist[0] = 1.0  # empty region: some valid direction
    return hist / np.linalg.norm(hist)


def _shape_signature(selected: np.ndarray) -> np.ndarray:
    """L2-normalised histogram of pixel distances to the region's centroid, divided by their
    mean: invariant to where the object sits, its size and its rotation."""
    ys, xs = np.nonzero(selected)
    hist = np.zeros(_RADIAL_BINS, dtype=np.float64)
    if len(xs) > 1:
        dist = np.hypot(xs - xs.mean(), ys - ys.mean())
        scaled = dist / max(dist.mean(), 1e-9)
        hist += np.bincount(np.minimum((scaled / 2.4 * _RADIAL_BINS).astype(np.int64), _RADIAL_BINS - 1),
                            minlength=_RADIAL_BINS)
    else:
        hist[0] = 1.0
    return hist / np.linalg.norm(hist)


def region_features(image: Image.Image, mask: Image.Image | None, region: Literal["object", "background"]) -> np.ndarray:
    """Feature vector of one region of an image (mask >= 128 = object).

    ``background``: RGB histogram of the pixels outside the object (context only, 512-d).
    ``object``: RGB histogram of the object's pixels plus its shape signature (524-d).
    """
    rgb, selected = _region_pixels(image, mask, region)
    colour = _colour_histogram(rgb[selected])
    if region == "background":
        return colour
    return np.concatenate([colour, _shape_signature(selected)])


def feature_scorer(region: str, *, name: str | None = None, batch_size: int = 64) -> Scorer:
    """A scorer whose embedding sees only one region (needs masks); see :func:`region_features`.

    ``region="background"`` sees only the context, ``region="object"`` only the object: on
    near-identity distractors (same background) the first must fail and the second succeed.
    """
    if region not in ("background", "object"):
        raise InvalidInputError(f"feature scorer region must be 'background' or 'object', got {region!r}")

    def embed(images: list[Image.Image], masks: list[Image.Image | None] | None) -> np.ndarray:
        masks = masks if masks is not None else [None] * len(images)
        return np.stack([region_features(im, m, region) for im, m in zip(images, masks)])  # type: ignore[arg-type]

    return Scorer(name=name or f"feature:{region}", embed_fn=embed, use_masks=True, batch_size=batch_size,
                  identity=f"feature:{region}:rgb{_HIST_BINS}" + (f"+radial{_RADIAL_BINS}" if region == "object" else ""))
