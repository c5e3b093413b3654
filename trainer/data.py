"""Training examples from NearID-format samples.

One example per sample and epoch, drawn deterministically from ``(seed, epoch, sample)`` so
that the same run on one process or on eight, uninterrupted or resumed, sees the same data:

- the anchor: one valid view chosen at random;
- ``P`` positive slots: the sample's other valid views (masked when fewer);
- ``K`` distractor slots: the sample's near-identity distractors. ``one_source`` (default)
  picks one distractor source per example (among the sources that have a distractor for
  this sample) and takes its distractors, the anchor's own one (same background) first;
  ``all_sources`` pools the distractors of every source and draws ``K`` of them, again the
  anchor's own ones first. Missing slots are masked;
- optional augmentations (flip, colour jitter, small translation/scale), drawn per image;
- optional foreground masking: the head attends only to the object's tokens.

Slots are laid out ``[anchor, positive_1..P, distractor_1..K]``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset, Sampler, default_collate

from comfy_nearid.data.base import NearIDDataset
from comfy_nearid.data.sample import ImageRef, Sample
from comfy_nearid.errors import ConfigError, DatasetError

from .config import AugmentConfig, DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetLayout",
    "EpochSampler",
    "ExampleDraw",
    "ImageSlot",
    "SampleLayout",
    "TrainingExamples",
    "collate_examples",
    "draw_example",
    "open_dataset",
    "scan_layout",
    "split_validation",
]


# --------------------------------------------------------------------------- readers


def _local_or_hub(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        from comfy_nearid.data.published import hub_snapshot

        return hub_snapshot(path, allow_download=False)
    raise DatasetError(f"dataset path {p} does not exist")


def open_dataset(
    data: DataConfig,
    which: str = "train",
    sources: Sequence[str] | None = None,
) -> NearIDDataset:
    """Open the reader for ``which`` ("train", "val" or "test") as configured in ``data``."""
    root = getattr(data, which)
    if root is None:
        raise ConfigError(f"data.{which} is not set")
    split = getattr(data, f"{which}_split")
    indices = getattr(data, f"{which}_indices")
    if data.format == "folder":
        from comfy_nearid.data.folder import FolderDataset

        # Every source is listed (cheap); scan_layout keeps the chosen ones and names the others.
        return FolderDataset(Path(root).expanduser(), split=split, sources=None, indices=indices)
    from comfy_nearid.data.published import PublishedNearIDDataset

    paths = dict(data.distractor_paths)
    if not paths:
        raise ConfigError(
            "data.distractor_paths is empty: the published format needs at least one "
            "{source: path} distractor dataset"
        )
    if sources is not None:
        unknown = [s for s in sources if s not in paths]
        if unknown:
            raise ConfigError(
                f"data sources {unknown} have no entry in data.distractor_paths (known: {sorted(paths)})"
            )
        paths = {s: paths[s] for s in sources}
    return PublishedNearIDDataset(
        _local_or_hub(root),
        {name: _local_or_hub(p) for name, p in paths.items()},
        indices=indices,
        split=split,
    )


# --------------------------------------------------------------------------- layout


@dataclass
class SampleLayout:
    """Which slots of one sample hold an image (no image is decoded to build this)."""

    index: int  # position in the reader
    id: str
    views: list[int]  # valid view indices
    distractors: dict[str, list[int]]  # source -> view indices that have a distractor
    has_view_mask: list[bool] = field(default_factory=list)
    category: str = ""

    def usable_sources(self) -> list[str]:
        return [s for s in sorted(self.distractors) if self.distractors[s]]


@dataclass
class DatasetLayout:
    """The layout of every sample of a reader, with the distractor sources in use."""

    samples: list[SampleLayout]
    sources: list[str]
    description: str

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def scan_layout(
    dataset: NearIDDataset,
    sources: Sequence[str] | None = None,
    require_distractors: bool = True,
    purpose: str = "training",
) -> DatasetLayout:
    """Read every sample's structure once and keep the ones usable for ``purpose``.

    Samples with fewer than two valid views are left out (counted in the log). Raises
    :class:`DatasetError` when no sample has two valid views, or (``require_distractors``)
    when no sample has a distractor from the chosen sources; :class:`ConfigError` when a
    requested source exists in no sample.
    """
    description = dataset.describe()
    present: set[str] = set()
    kept: list[SampleLayout] = []
    too_few_views = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        present.update(s for s, refs in sample.distractors.items() if any(r is not None for r in refs))
        views = sample.valid_views()
        if len(views) < 2:
            too_few_views += 1
            continue
        wanted = sample.sources if sources is None else [s for s in sources if s in sample.distractors]
        dist = {s: [k for k in views if sample.distractor(s, k) is not None] for s in wanted}
        kept.append(
            SampleLayout(
                index=index,
                id=sample.id,
                views=views,
                distractors=dist,
                has_view_mask=[m is not None for m in sample.masks],
                category=sample.category,
            )
        )
    if sources is not None:
        missing = [s for s in sources if s not in present]
        if missing:
            raise ConfigError(
                f"distractor source(s) {missing} do not occur in {description}; sources found: {sorted(present)}"
            )
    used_sources = sorted(present) if sources is None else list(sources)
    if not kept:
        raise DatasetError(
            f"{description}: every one of its {len(dataset)} samples has fewer than two valid views; "
            f"{purpose} needs an anchor and at least one positive view per sample"
        )
    if too_few_views:
        logger.warning(
            "%s: %d of %d samples have fewer than two valid views and are left out of %s",
            description, too_few_views, len(dataset), purpose,
        )
    with_distractor = sum(1 for s in kept if s.usable_sources())
    if require_distractors and with_distractor == 0:
        raise DatasetError(
            f"{description} has no near-identity distractor for sources {used_sources or '(none)'} in any "
            f"usable sample; the two-tier objective needs distractors (sources found: {sorted(present)})"
        )
    if with_distractor < len(kept):
        logger.warning(
            "%s: %d of %d usable samples have no distractor from %s (they train Tier 1 only)",
            description, len(kept) - with_distractor, len(kept), used_sources,
        )
    return DatasetLayout(samples=kept, sources=used_sources, description=description)


def split_validation(
    layout: DatasetLayout, fraction: float, seed: int, by: str = "identity"
) -> tuple[DatasetLayout, DatasetLayout]:
    """Hold out ``fraction`` of the samples as a validation set: a seeded random choice of
    samples (``by="identity"``), or of whole categories (``by="category"``: categories in a
    seeded order until at least ``fraction`` of the samples are held out), so that the
    validation identities come from categories the head never trains on, like a test split
    of unseen categories."""
    n = len(layout)
    n_val = int(round(n * fraction))
    if by == "category":
        categories = [s.category for s in layout.samples]
        names = sorted(set(categories))
        if len(names) < 2:
            raise ConfigError(
                f"data.val_split_by=category needs samples of at least 2 categories; {layout.description} "
                f"has {len(names)} ({names[:3]})"
            )
        held: set[str] = set()
        count = 0
        for i in np.random.default_rng([seed, 0x7A1]).permutation(len(names)).tolist():
            if count >= max(1, n_val):
                break
            held.add(names[i])
            count += categories.count(names[i])
        val_pos = {i for i, c in enumerate(categories) if c in held}
        n_val = len(val_pos)
        what = f"categories {sorted(held)}"
    elif by == "identity":
        order = np.random.default_rng([seed, 0x7A1]).permutation(n)
        val_pos = set(order[:n_val].tolist())
        what = f"{fraction:g}"
    else:
        raise ConfigError(f"data.val_split_by must be 'identity' or 'category', got {by!r}")
    if n_val < 1 or n_val >= n:
        raise ConfigError(
            f"data.val_fraction={fraction} (by {by}) leaves {n_val} validation and {n - n_val} training samples "
            f"out of {n}; both need at least one"
        )
    train = [s for i, s in enumerate(layout.samples) if i not in val_pos]
    val = [s for i, s in enumerate(layout.samples) if i in val_pos]
    return (
        DatasetLayout(train, layout.sources, layout.description),
        DatasetLayout(val, layout.sources, layout.description + f" (validation hold-out {what})"),
    )


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class ImageSlot:
    """One image of an example: a view (``source is None``) or a distractor of view ``view``."""

    view: int
    source: str | None = None

    def ref(self, sample: Sample) -> ImageRef | None:
        return sample.views[self.view] if self.source is None else sample.distractor(self.source, self.view)

    def mask_ref(self, sample: Sample) -> ImageRef | None:
        """The slot's object mask. A distractor without a mask of its own takes its view's
        mask (it was inpainted at the same place): the evaluator's rule, PROTOCOL section 8."""
        view_mask = sample.masks[self.view] if self.view < len(sample.masks) else None
        if self.source is None:
            return view_mask
        masks = sample.distractor_masks.get(self.source)
        own = masks[self.view] if masks is not None and self.view < len(masks) else None
        return own if own is not None else view_mask


@dataclass(frozen=True)
class ExampleDraw:
    """The slots of one example: ``1 + P + K`` entries, None = masked slot."""

    slots: tuple[ImageSlot | None, ...]

    @property
    def valid(self) -> list[bool]:
        return [s is not None for s in self.slots]


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one example (independent of process count and worker)."""
    return np.random.default_rng([seed, epoch, index])


def draw_example(
    layout: SampleLayout,
    rng: np.random.Generator,
    positives: int,
    negatives: int,
    distractor_mode: str = "one_source",
) -> ExampleDraw:
    """Anchor, positive and distractor slots for one sample (see the module docstring)."""
    anchor = int(rng.choice(layout.views))
    others = [k for k in layout.views if k != anchor]
    if len(others) > positives:
        others = sorted(int(k) for k in rng.choice(others, size=positives, replace=False))
    pos_slots: list[ImageSlot | None] = [ImageSlot(k) for k in others]
    pos_slots += [None] * (positives - len(pos_slots))

    usable = layout.usable_sources()
    candidates: list[ImageSlot] = []
    if usable and distractor_mode == "one_source":
        source = usable[int(rng.integers(len(usable)))]
        views = layout.distractors[source]
        ordered = ([anchor] if anchor in views else []) + [k for k in views if k != anchor]
        candidates = [ImageSlot(k, source) for k in ordered][:negatives]
    elif usable:
        own = [ImageSlot(anchor, s) for s in usable if anchor in layout.distractors[s]]
        rest = [ImageSlot(k, s) for s in usable for k in layout.distractors[s] if k != anchor]
        rng.shuffle(own)  # type: ignore[arg-type]
        rng.shuffle(rest)  # type: ignore[arg-type]
        candidates = (own + rest)[:negatives]
    neg_slots: list[ImageSlot | None] = list(candidates) + [None] * (negatives - len(candidates))
    return ExampleDraw(slots=(ImageSlot(anchor), *pos_slots, *neg_slots))


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding ``(epoch, position)`` keys.

    The epoch travels with every key, so a dataset worker needs no shared state to draw the
    example of that epoch; ``set_epoch`` picks the permutation (seed and epoch only).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.size)
        else:
            order = np.arange(self.size)
        for position in order.tolist():
            yield (self.epoch, position)


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentParams:
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    scale: float = 1.0
    shift_x: float = 0.0  # fraction of the width
    shift_y: float = 0.0

    @property
    def geometric(self) -> bool:
        return self.scale != 1.0 or self.shift_x != 0.0 or self.shift_y != 0.0


def draw_augment(cfg: AugmentConfig, rng: np.random.Generator) -> AugmentParams:
    """Augmentation parameters of one image (a fixed number of draws, whatever is enabled)."""
    u = rng.random(3)
    jitter = rng.uniform(1 - cfg.color_jitter_strength, 1 + cfg.color_jitter_strength, size=3)
    scale = rng.uniform(cfg.scale_min, cfg.scale_max)
    shift = rng.uniform(-cfg.translate_fraction, cfg.translate_fraction, size=2)
    do_jitter = u[1] < cfg.color_jitter_prob
    do_move = u[2] < cfg.translate_prob
    return AugmentParams(
        flip=bool(u[0] < cfg.flip_prob),
        brightness=float(jitter[0]) if do_jitter else 1.0,
        contrast=float(jitter[1]) if do_jitter else 1.0,
        saturation=float(jitter[2]) if do_jitter else 1.0,
        scale=float(scale) if do_move else 1.0,
        shift_x=float(shift[0]) if do_move else 0.0,
        shift_y=float(shift[1]) if do_move else 0.0,
    )


def _affine(img: Image.Image, p: AugmentParams, resample: int, fill: Any) -> Image.Image:
    w, h = img.size
    cx, cy = w / 2.0, h / 2.0
    tx, ty = p.shift_x * w, p.shift_y * h
    # Output pixel (x, y) reads input ((x - cx - tx) / s + cx, (y - cy - ty) / s + cy).
    inv = 1.0 / p.scale
    data = (inv, 0.0, cx - (cx + tx) * inv, 0.0, inv, cy - (cy + ty) * inv)
    return img.transform((w, h), Image.Transform.AFFINE, data, resample=resample, fillcolor=fill)


def apply_augment(
    image: Image.Image, mask: Image.Image | None, p: AugmentParams
) -> tuple[Image.Image, Image.Image | None]:
    """Apply ``p`` to an RGB image and (geometry only) to its mask."""
    if p.flip:
        image = ImageOps.mirror(image)
        mask = ImageOps.mirror(mask) if mask is not None else None
    if p.brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(p.brightness)
    if p.contrast != 1.0:
        image = ImageEnhance.Contrast(image).enhance(p.contrast)
    if p.saturation != 1.0:
        image = ImageEnhance.Color(image).enhance(p.saturation)
    if p.geometric:
        image = _affine(image, p, Image.Resampling.BILINEAR, (0, 0, 0))
        if mask is not None:
            if mask.size != image.size:
                mask = mask.resize(image.size, Image.Resampling.NEAREST)
            mask = _affine(mask, p, Image.Resampling.NEAREST, 0)
    return image, mask


# --------------------------------------------------------------------------- torch dataset


class TrainingExamples(Dataset):
    """Examples for the training loop; items are keyed by ``(epoch, position)``.

    Two modes:

    - live (``cached is None``): items hold preprocessed pixels ``pixels`` ``[S, 3, H, W]``
      (zeros in masked slots); the loop runs the frozen backbone on them.
    - cached (``cached = (FeatureCache, SlotRows)``): items hold the slots' frozen tokens
      ``tokens`` ``[S, N, D]`` (the cache's dtype; zeros in masked slots), read from disk.

    Every item also holds ``position`` (the sample's position in ``layout``), ``valid``
    ``[S]`` (bool) and, with foreground masking, ``token_mask`` ``[S, N]`` (bool).
    """

    def __init__(
        self,
        dataset: NearIDDataset,
        layout: DatasetLayout,
        data: DataConfig,
        augment: AugmentConfig,
        seed: int,
        spec: Any,
        cached: "tuple[Any, Any] | None" = None,
    ) -> None:
        self.dataset = dataset
        self.layout = layout
        self.data = data
        self.augment = augment
        self.seed = seed
        self.spec = spec
        self.preprocess = spec.preprocess
        self.cached = cached  # (FeatureCache, SlotRows) or None
        self.num_slots = 1 + data.positives + data.negatives

    def __len__(self) -> int:
        return len(self.layout)

    def draw(self, epoch: int, position: int) -> tuple[ExampleDraw, np.random.Generator]:
        layout = self.layout.samples[position]
        rng = example_rng(self.seed, epoch, layout.index)
        draw = draw_example(layout, rng, self.data.positives, self.data.negatives, self.data.distractor_mode)
        return draw, rng

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, position = key
        draw, rng = self.draw(epoch, position)
        item: dict[str, torch.Tensor] = {
            "position": torch.tensor(position, dtype=torch.long),
            "valid": torch.tensor(draw.valid, dtype=torch.bool),
        }
        sample_index = self.layout.samples[position].index
        if self.cached is not None:
            cache, slot_rows = self.cached
            rows = [slot_rows(sample_index, slot) if slot is not None else -1 for slot in draw.slots]
            tokens, token_mask = cache.read(rows)
            item["tokens"] = tokens
            if self.data.foreground_mask:
                item["token_mask"] = token_mask
            return item
        item.update(self._load_pixels(draw, rng, sample_index))
        return item

    def __getitems__(self, keys: list[tuple[int, int]]) -> "dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]":
        """A whole batch at once (the DataLoader calls this instead of ``__getitem__`` per key).

        Cached mode: one batched read of every slot's cache row, already stacked: ``position``
        ``[B]``, ``valid`` ``[B, S]``, ``tokens`` ``[B, S, N, D]`` (and ``token_mask``
        ``[B, S, N]``), the same values as stacking ``self[key]`` for each key; live mode: the
        list of items (stacked by :func:`collate_examples`).
        """
        if self.cached is None:
            return [self[key] for key in keys]
        cache, slot_rows = self.cached
        positions = np.empty(len(keys), dtype=np.int64)
        rows = np.empty((len(keys), self.num_slots), dtype=np.int64)
        for b, (epoch, position) in enumerate(keys):
            draw, _ = self.draw(epoch, position)
            sample_index = self.layout.samples[position].index
            positions[b] = position
            rows[b] = [slot_rows(sample_index, slot) if slot is not None else -1 for slot in draw.slots]
        tokens, token_mask = cache.read(rows)
        batch = {"position": torch.from_numpy(positions), "valid": torch.from_numpy(rows >= 0), "tokens": tokens}
        if self.data.foreground_mask:
            batch["token_mask"] = token_mask
        return batch


    def _load_pixels(self, draw: ExampleDraw, rng: np.random.Generator, sample_index: int) -> dict[str, torch.Tensor]:
        from comfy_nearid.model import mask_token_grid

        sample = self.dataset[sample_index]  # type: ignore[index]
        size = self.spec.image_size
        pixels = torch.zeros(self.num_slots, 3, size, size)
        token_mask = torch.ones(self.num_slots, self.spec.num_tokens, dtype=torch.bool)
        # One augmentation draw per slot, also for masked slots, so the stream never shifts.
        params = [draw_augment(self.augment, rng) for _ in draw.slots]
        for i, slot in enumerate(draw.slots):
            if slot is None:
                continue
            image = slot.ref(sample).load()  # type: ignore[union-attr]
            mask = None
            if self.data.foreground_mask:
                mask_ref = slot.mask_ref(sample)
                mask = mask_ref.load() if mask_ref is not None else None
            if self.augment.enabled:
                image, mask = apply_augment(image, mask, params[i])
            pixels[i] = self.preprocess(image)
            if mask is not None:
                # an augmentation may push the object out of the frame: an empty mask keeps
                # every token (the one policy, see mask_token_grid)
                token_mask[i] = mask_token_grid(mask, self.spec)
        out = {"pixels": pixels}
        if self.data.foreground_mask:
            out["token_mask"] = token_mask
        return out


def collate_examples(batch: "dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]") -> dict[str, torch.Tensor]:
    """The DataLoader's collate function for :class:`TrainingExamples`: a batch that
    ``__getitems__`` read whole passes through; a list of items is stacked."""
    if isinstance(batch, dict):
        return batch
    return default_collate(batch)


def epochs_for_steps(max_steps: int | None, steps_per_epoch: int, epochs: int) -> int:
    """Epochs needed to reach ``max_steps`` optimizer steps (capped by ``epochs``)."""
    if max_steps is None:
        return epochs
    return min(epochs, max(1, math.ceil(max_steps / max(1, steps_per_epoch))))
