"""Validation SSR / PA of a head during training (PROTOCOL section 4).

Each image of the validation samples is embedded once (from the feature cache or through the
backbone), the view-view and view-distractor cosines are assembled per distractor source, and
the margins, SSR and PA come from :mod:`comfy_nearid.metrics.ssr` (the evaluator's own
metric functions). Sources are pooled as the protocol says: samples for SSR, trials for PA.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from comfy_nearid.data.base import NearIDDataset
from comfy_nearid.errors import DatasetError, InvalidInputError
from comfy_nearid.metrics.ssr import SSRStats, margins_from_similarities, pool_stats, ssr_stats

from .data import DatasetLayout, ImageSlot

logger = logging.getLogger(__name__)

SlotKey = tuple[int, ImageSlot]  # (reader position, slot)
Embedder = Callable[[Sequence[SlotKey]], torch.Tensor]  # -> [n, E] unit vectors, CPU float32

__all__ = ["EvalResult", "cached_head_embedder", "evaluate_layout", "live_embedder"]


@dataclass
class EvalResult:
    """SSR / PA (percent) pooled over sources, and per source (None: no valid margin)."""

    pooled: SSRStats
    by_source: dict[str, SSRStats | None] = field(default_factory=dict)
    # the cosines behind the margins, for fitting the identity-match curve (not in to_dict):
    same_cosines: np.ndarray | None = field(default=None, repr=False)  # view pairs, once each
    near_cosines: np.ndarray | None = field(default=None, repr=False)  # view vs own distractor, every source

    @property
    def ssr(self) -> float:
        return self.pooled.ssr

    @property
    def pa(self) -> float:
        return self.pooled.pa

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.pooled.to_dict(),
            "by_source": {s: (v.to_dict() if v is not None else None) for s, v in self.by_source.items()},
        }


def _slots_of(layout: DatasetLayout, sources: Sequence[str]) -> list[SlotKey]:
    keys: list[SlotKey] = []
    for s in layout.samples:
        keys += [(s.index, ImageSlot(k)) for k in s.views]
        keys += [(s.index, ImageSlot(k, src)) for src in sources for k in s.distractors.get(src, [])]
    return keys


def evaluate_layout(layout: DatasetLayout, sources: Sequence[str], embed: Embedder) -> EvalResult:
    """SSR / PA of the embeddings ``embed`` gives for the samples of ``layout``."""
    if not sources:
        raise InvalidInputError("validation needs at least one distractor source")
    keys = _slots_of(layout, sources)
    vectors = embed(keys).double().numpy()
    position = {key: i for i, key in enumerate(keys)}
    n_views = max(max(s.views) + 1 for s in layout.samples)
    view_sims = np.full((len(layout), n_views, n_views), np.nan)
    for r, s in enumerate(layout.samples):
        for a in s.views:
            for b in s.views:
                if a < b:
                    va = vectors[position[(s.index, ImageSlot(a))]]
                    vb = vectors[position[(s.index, ImageSlot(b))]]
                    view_sims[r, a, b] = view_sims[r, b, a] = float(va @ vb)
    by_source: dict[str, SSRStats | None] = {}
    near: list[np.ndarray] = []
    for src in sources:
        own = np.full((len(layout), n_views), np.nan)
        for r, s in enumerate(layout.samples):
            for k in s.distractors.get(src, []):
                own[r, k] = float(
                    vectors[position[(s.index, ImageSlot(k))]] @ vectors[position[(s.index, ImageSlot(k, src))]]
                )
        near.append(own[np.isfinite(own)])
        margins = margins_from_similarities(view_sims, own)
        try:
            by_source[src] = ssr_stats(margins)
        except DatasetError:
            by_source[src] = None  # this source has no distractor in these samples
    parts = [v for v in by_source.values() if v is not None]
    if not parts:
        raise DatasetError(
            f"{layout.description}: no validation sample has a distractor from {list(sources)}, "
            "so SSR/PA cannot be measured"
        )
    iu = np.triu_indices(n_views, k=1)
    same = view_sims[:, iu[0], iu[1]].reshape(-1)
    return EvalResult(pooled=pool_stats(parts), by_source=by_source,
                      same_cosines=same[np.isfinite(same)], near_cosines=np.concatenate(near))


def cached_head_embedder(
    head: torch.nn.Module,
    cache: Any,
    slot_rows: Any,
    device: torch.device,
    foreground_mask: bool,
    batch_size: int,
) -> Embedder:
    """Embed slots with ``head`` over tokens read from the feature cache."""

    @torch.no_grad()
    def embed(keys: Sequence[SlotKey]) -> torch.Tensor:
        out = []
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            tokens, masks = cache.read([slot_rows(i, slot) for i, slot in chunk])
            mask = masks.to(device) if foreground_mask else None
            out.append(head(tokens.to(device).float(), mask=mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    return embed


def live_embedder(
    model: Any,
    dataset: NearIDDataset,
    readout: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    foreground_mask: bool,
    batch_size: int,
) -> Embedder:
    """Embed slots by loading their images: ``readout(pixels [n,3,S,S], token_mask [n,N] | None)``
    gives the embeddings (see :func:`head_readout`)."""
    from comfy_nearid.model import masks_to_token_mask

    @torch.no_grad()
    def embed(keys: Sequence[SlotKey]) -> torch.Tensor:
        out = []
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            samples = {i: dataset[i] for i in {i for i, _ in chunk}}
            images, token_masks = [], []
            for i, slot in chunk:
                images.append(slot.ref(samples[i]).load())  # type: ignore[union-attr]
                keep = torch.ones(model.spec.num_tokens, dtype=torch.bool)
                mask_ref = slot.mask_ref(samples[i]) if foreground_mask else None
                if mask_ref is not None:
                    arr = np.asarray(mask_ref.load(), dtype=np.float32) / 255.0
                    try:
                        keep = masks_to_token_mask([arr], model.spec)[0]
                    except InvalidInputError:
                        pass
                token_masks.append(keep)
            pixels = model.preprocess.batch(images)
            mask = torch.stack(token_masks) if foreground_mask else None
            out.append(readout(pixels, mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    return embed


def head_readout(model: Any, head: torch.nn.Module, token_dtype: torch.dtype) -> Callable:
    """Pixels -> backbone tokens (rounded to ``token_dtype``, as training sees them) -> head."""

    def readout(pixels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tokens = model.tokens(pixels).to(token_dtype).float()
        return head(tokens.clone(), mask=None if mask is None else mask.to(tokens.device))

    return readout


def format_result(name: str, result: EvalResult) -> str:
    """One log line: pooled SSR/PA and each source's SSR."""
    per = ", ".join(
        f"{s} {v.ssr:.1f}" if v is not None else f"{s} -" for s, v in result.by_source.items()
    )
    return f"{name}: SSR {result.ssr:.2f} PA {result.pa:.2f} (n={result.pooled.n_samples}; per source SSR: {per})"


def is_better(value: float, best: float) -> bool:
    return not math.isnan(value) and value > best
