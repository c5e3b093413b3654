"""NearID Heatmap: where the NearID head looked, as a coloured overlay on the image."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from comfy_nearid.errors import InvalidInputError

from . import comfy_compat
from .loader import MODEL_TYPE
from .scoring import (
    COMBINE_MODES,
    DEFAULT_BATCH,
    EMBEDDING_TYPE,
    _check_images,
    _check_mask,
    _check_model,
    format_scores,
    score_candidates,
)

# Colour maps as evenly spaced RGB stops (0..1), interpolated linearly.
COLORMAPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # perceptually ordered dark -> bright (inferno's values at 0, 1/4, 1/2, 3/4, 1)
    "inferno": ((0.001, 0.0, 0.014), (0.341, 0.062, 0.429), (0.735, 0.216, 0.330),
                (0.978, 0.557, 0.035), (0.988, 1.0, 0.645)),
    # blue -> cyan -> green -> yellow -> red
    "jet": ((0.0, 0.0, 0.5), (0.0, 0.5, 1.0), (0.5, 1.0, 0.5), (1.0, 0.5, 0.0), (0.5, 0.0, 0.0)),
    "gray": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def apply_colormap(values: torch.Tensor, name: str = "inferno") -> torch.Tensor:
    """Values ``[H, W]`` in 0..1 -> RGB ``[H, W, 3]`` in 0..1 (piecewise linear over the stops)."""
    if name not in COLORMAPS:
        raise InvalidInputError(f"colormap must be one of {sorted(COLORMAPS)}, got {name!r}")
    stops = torch.tensor(COLORMAPS[name], dtype=torch.float32)
    pos = values.clamp(0, 1).float() * (len(stops) - 1)
    low = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - low.float()).unsqueeze(-1)
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def attention_to_image(attention: torch.Tensor, image_size: int, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Token-grid attention ``[gh, gw]`` -> a map ``[height, width]`` in 0..1 (max = 1).

    The model sees the image squashed to ``image_size``^2; token ``(i, j)`` covers the pixels
    ``[i*patch, (i+1)*patch)`` there. Pixels past the grid (when ``image_size`` is not a multiple
    of ``patch_size``) are not seen by the model and get 0. The map is then stretched back to
    the original size.
    """
    gh, gw = attention.shape
    top = float(attention.max())
    grid = attention.float() / top if top > 0 else torch.zeros_like(attention, dtype=torch.float32)
    covered = F.interpolate(grid[None, None], size=(gh * patch_size, gw * patch_size), mode="bilinear", align_corners=False)
    full = torch.zeros((1, 1, image_size, image_size), dtype=torch.float32)
    full[..., : gh * patch_size, : gw * patch_size] = covered
    resized = F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp(0, 1)


def overlay(image: torch.Tensor, heat: torch.Tensor, opacity: float, colormap: str) -> torch.Tensor:
    """Blend a colour-mapped ``heat`` ``[H, W]`` over ``image`` ``[H, W, C]`` (0..1): ``(1 - a) * image + a * colour``."""
    if not 0.0 <= opacity <= 1.0:
        raise InvalidInputError(f"opacity must be in 0..1, got {opacity}")
    rgb = image[..., :3].float()
    if rgb.shape[-1] == 1:
        rgb = rgb.expand(*rgb.shape[:-1], 3)
    return ((1 - opacity) * rgb + opacity * apply_colormap(heat, colormap)).clamp(0, 1)


class NearIDHeatmap:
    """Overlay the NearID head's attention on each image."""

    DESCRIPTION = (
        "Shows where the NearID head looked: its attention over the image patches (mean over heads) "
        "as a coloured overlay, plus the map as a MASK. With a reference connected, the preview "
        "also lists each image's identity score."
    )
    CATEGORY = "NearID/visualise"
    FUNCTION = "heatmap"
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("overlay", "attention", "preview")
    OUTPUT_TOOLTIPS = (
        "The images with the attention drawn over them.",
        "The attention map at image size, 0..1 (1 = the most attended patch).",
        "Text: the identity scores when a reference is connected.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "nearid_model": (MODEL_TYPE, {"tooltip": "The model from Load NearID Model."}),
                "images": ("IMAGE", {"tooltip": "Candidate image(s) to explain."}),
                "opacity": ("FLOAT", {"default": 0.55, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "How strongly the colour covers the image (0 = image only, 1 = colour only)."}),
                "colormap": (list(COLORMAPS), {"default": "inferno", "tooltip": "Colours from low to high attention."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject mask(s) of the images (1 = subject); attention is then limited to the subject."}),
                "reference": ("IMAGE", {"tooltip": "Optional reference image(s): the preview then shows each image's identity score."}),
                "reference_embedding": (EMBEDDING_TYPE, {"tooltip": "Optional reference embeddings from NearID Embed, instead of or with reference images."}),
                "combine": (COMBINE_MODES, {"default": "mean", "tooltip": "How several references combine into one score."}),
            },
        }

    def heatmap(self, nearid_model: Any, images: Any, opacity: float = 0.55, colormap: str = "inferno",
                mask: Any = None, reference: Any = None, reference_embedding: Any = None,
                combine: str = "mean") -> dict[str, Any]:
        model = _check_model(nearid_model)
        if model.readout != "head":
            raise InvalidInputError(
                f"the heatmap shows the NearID head's attention; this model uses readout {model.readout!r} (load it with readout 'head')"
            )
        images = _check_images(images, "images")
        mask = _check_mask(mask, images, "mask", "images")
        b, h, w = images.shape[:3]
        progress = comfy_compat.progress_bar(b)
        overlays, maps = [], []
        for i in range(b):
            comfy_compat.check_interrupted()
            m = None if mask is None else mask[i if mask.shape[0] > 1 else 0]
            attention = model.attention_map(images[i : i + 1], None if m is None else m[None])
            heat = attention_to_image(attention, model.spec.image_size, model.spec.patch_size, h, w)
            overlays.append(overlay(images[i], heat, opacity, colormap))
            maps.append(heat)
            progress.update(1)
        preview = ""
        if reference is not None or reference_embedding is not None:
            result = score_candidates(model, images, reference, None, mask, reference_embedding, combine, DEFAULT_BATCH)
            preview = format_scores(result, marks={result.best_index: "**best**"})
        ui = {"text": [preview]} if preview else {}
        return {"ui": ui, "result": (torch.stack(overlays), torch.stack(maps), preview)}


NODE_CLASS_MAPPINGS = {"NearIDHeatmap": NearIDHeatmap}
NODE_DISPLAY_NAME_MAPPINGS = {"NearIDHeatmap": "NearID Heatmap"}
