"""Planning and embedding: every distinct image of a dataset embedded once; the similarity table."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatasetError, InvalidInputError
from ..masking import MaskKeep, MaskMode, apply_pixel_mask
from ..metrics.table import N_VIEWS, SimilarityTable
from .scorers import Benchmark, EmbedFn, Scorer, check_mask_options

if TYPE_CHECKING:
    from ..data.sample import ImageRef, Sample

logger = logging.getLogger(__name__)

@dataclass
class _Plan:
    """What to embed (distinct images) and how rows map onto it (indices, -1 = missing)."""

    items: list[tuple["ImageRef", "ImageRef | None"]] = field(default_factory=list)
    index: dict[tuple[str, str | None], int] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    view_idx: list[list[int]] = field(default_factory=list)
    distractor_idx: list[list[int]] = field(default_factory=list)
    oracle: list[list[float]] = field(default_factory=list)
    images: list[dict[str, list[Any]]] = field(default_factory=list)
    n_slots: int = 0

    def add(self, ref: "ImageRef | None", mask: "ImageRef | None", use_masks: bool) -> int:
        if ref is None:
            return -1
        self.n_slots += 1
        mask = mask if use_masks else None
        key = (ref.key, None if mask is None else mask.key)
        if key not in self.index:
            self.index[key] = len(self.items)
            self.items.append((ref, mask))
        return self.index[key]


def _padded(refs: Sequence[Any], sample_id: str, what: str) -> list[Any]:
    if len(refs) > N_VIEWS:
        extra = [k + 1 for k in range(N_VIEWS, len(refs)) if refs[k] is not None]
        if extra:
            raise DatasetError(
                f"sample {sample_id!r}: {what} {extra} present; the protocol uses at most {N_VIEWS} views per sample"
            )
    return list(refs[:N_VIEWS]) + [None] * (N_VIEWS - min(len(refs), N_VIEWS))


def _mask_fraction(ref: "ImageRef") -> float:
    """Share of pixels marked as subject (>= 128) in a mask image, in [0, 1]."""
    mask = np.asarray(ref.load().convert("L"))
    return float((mask >= 128).mean())


def _mtg_oracle(sample: "Sample") -> list[float]:
    """Per view ``1 - part_area / object_area`` from the part and object masks (NaN if absent).

    Areas are fractions of each mask's own image, so masks saved at different resolutions
    still compare.
    """
    out = [float("nan")] * N_VIEWS
    masks = _padded(sample.masks, sample.id, "masks")
    parts = _padded(sample.part_masks, sample.id, "part masks")
    for k in range(N_VIEWS):
        if masks[k] is None or parts[k] is None:
            continue
        obj = _mask_fraction(masks[k])
        if obj <= 0.0:
            logger.warning("sample %r view %d: empty object mask, no oracle", sample.id, k + 1)
            continue
        out[k] = 1.0 - _mask_fraction(parts[k]) / obj
    return out


def _plan(
    dataset: Iterable["Sample"],
    *,
    use_masks: bool,
    sources: Sequence[str] | None,
    benchmark: Benchmark,
    progress: bool,
) -> _Plan:
    plan = _Plan()
    n_samples = 0
    no_distractor: list[str] = []
    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    for sample in tqdm(dataset, total=total, desc="listing images", disable=not progress, leave=False):
        n_samples += 1
        views = _padded(sample.views, sample.id, "views")
        masks = _padded(sample.masks, sample.id, "masks")
        view_idx = [plan.add(v, m, use_masks) for v, m in zip(views, masks)]
        wanted = [s for s in (sources if sources is not None else sample.sources) if s in sample.distractors]
        if not wanted:
            no_distractor.append(sample.id)
        oracle = _mtg_oracle(sample) if benchmark == "mtg" else [float("nan")] * N_VIEWS
        for source in wanted:
            dists = _padded(sample.distractors[source], sample.id, f"distractors of {source!r}")
            dmasks = _padded(sample.distractor_masks.get(source, []), sample.id, f"distractor masks of {source!r}")
            # a distractor is inpainted into its view's object region on the same background,
            # so without a mask of its own it takes its view's mask (MTG data ships only those)
            dmasks = [dm if dm is not None else vm for dm, vm in zip(dmasks, masks)]
            plan.ids.append(sample.id)
            plan.categories.append(sample.category)
            plan.sources.append(source)
            plan.view_idx.append(view_idx)
            plan.distractor_idx.append([plan.add(d, m, use_masks) for d, m in zip(dists, dmasks)])
            plan.oracle.append(oracle)
            plan.images.append({"views": views, "distractors": dists})
    if n_samples == 0:
        raise DatasetError("the dataset holds no samples; nothing to evaluate")
    if no_distractor:
        logger.warning(
            "%d of %d samples have no distractor%s and are not evaluated (first: %s)",
            len(no_distractor), n_samples,
            f" from sources {list(sources)}" if sources is not None else "", no_distractor[:3],
        )
    if not plan.ids:
        raise DatasetError(
            f"none of the {n_samples} samples has a distractor"
            + (f" from sources {list(sources)}" if sources is not None else "")
            + "; nothing to evaluate"
        )
    return plan


# --------------------------------------------------------------------------- embedding


def _to_numpy(embeddings: Any, expected_rows: int) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().to("cpu").double().numpy()
    arr = np.asarray(embeddings, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != expected_rows:
        raise InvalidInputError(f"embed_fn must return [N={expected_rows}, D] embeddings, got shape {arr.shape}")
    return arr


def embed_images(
    items: Sequence[tuple["ImageRef", "ImageRef | None"]],
    embed_fn: EmbedFn,
    *,
    use_masks: bool = False,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "embedding",
    mask_mode: MaskMode = "attention",
    mask_keep: MaskKeep = "foreground",
    decode_threads: int = 2,
    cores: int = 1,
) -> np.ndarray:
    """Embed ``(image, mask)`` refs in batches; returns ``[N, D]`` float64 unit vectors.

    ``decode_threads`` threads decode the next two batches while ``embed_fn`` runs (0: decode
    inline). With ``cores > 1`` (a thread-safe ``embed_fn`` computing on the CPU), ``cores``
    threads instead each decode and embed whole batches of their own, torch on one thread
    each (:func:`~comfy_nearid.prefetch.batches_on_cores`).

    With ``use_masks``, ``mask_mode="attention"`` hands each image's mask (or ``None``) to
    ``embed_fn``; ``"pixels"`` hands it the reference's masked copy instead
    (:func:`~comfy_nearid.masking.apply_pixel_mask` with ``mask_keep``) and no masks. An
    image without a mask is used whole either way. Each image's embedding depends on the
    image and its mask only, never on which batch it falls in.

    Raises:
        InvalidInputError: ``embed_fn`` returned a wrong shape, or an all-zero / non-finite
            embedding (no direction, so no cosine), naming the image.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    check_mask_options(mask_mode, mask_keep)
    from ..prefetch import batches_on_cores, prefetch

    def load(item: tuple["ImageRef", "ImageRef | None"]) -> tuple[Any, Any]:
        ref, mask = item
        return ref.load(), (None if mask is None or not use_masks else mask.load())

    def embed(loaded: Sequence[tuple[Any, Any]]) -> np.ndarray:
        images = [image for image, _ in loaded]
        masks = [mask for _, mask in loaded] if use_masks else None
        if masks is not None and mask_mode == "pixels":
            images = [im if m is None else apply_pixel_mask(im, m, mask_keep) for im, m in zip(images, masks)]
            masks = None
        return _to_numpy(embed_fn(images, masks), len(loaded))

    chunks: list[np.ndarray] = []
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    if cores > 1:
        embedded: Iterable[tuple[Any, np.ndarray]] = batches_on_cores(
            lambda batch: embed([load(item) for item in batch]), batches, cores)
    else:  # the next batches' images are decoded in threads while embed_fn runs on this one
        embedded = ((batch, embed(loaded)) for batch, loaded, _ in prefetch(load, batches, decode_threads, depth=2))
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        for batch, chunk in embedded:
            chunks.append(chunk)
            bar.update(len(batch))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float64)
    emb = np.concatenate(chunks, axis=0)
    norms = np.linalg.norm(emb, axis=1)
    bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))
    if bad.size:
        raise InvalidInputError(
            f"embedding of {items[int(bad[0])][0].describe()} is zero or not finite (norm {norms[bad[0]]}); "
            "a cosine needs a non-zero finite vector"
        )
    return emb / norms[:, None]


def _world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (:func:`comfy_nearid.launch.launch_info`)."""
    from ..launch import launch_info

    info = launch_info()
    return info.rank, info.world_size


def _embed_distributed(items: Sequence[tuple["ImageRef", "ImageRef | None"]], scorer: Scorer, progress: bool) -> np.ndarray:
    """Embed on every process a strided share of the distinct images and gather all of them."""
    rank, world = _world()
    if world <= 1:
        return embed_images(items, scorer.embed_fn, use_masks=scorer.use_masks, mask_mode=scorer.mask_mode,
                            mask_keep=scorer.mask_keep, batch_size=scorer.batch_size, progress=progress,
                            desc=f"embedding ({scorer.name})", cores=scorer.cores)
    import torch
    from accelerate.utils import gather_object  # lazy: only when launched on several processes

    from ..launch import process_state

    state = process_state(cpu=not torch.cuda.is_available())
    share = list(range(state.process_index, len(items), state.num_processes))
    logger.info("process %d/%d embeds %d of %d distinct images", state.process_index, state.num_processes,
                len(share), len(items))
    local = embed_images([items[i] for i in share], scorer.embed_fn, use_masks=scorer.use_masks,
                         mask_mode=scorer.mask_mode, mask_keep=scorer.mask_keep,
                         batch_size=scorer.batch_size, progress=progress and state.is_main_process,
                         desc=f"embedding ({scorer.name}, {state.num_processes} processes)", cores=scorer.cores)
    gathered = gather_object([(share, local)])
    dim = next(e.shape[1] for idx, e in gathered if len(idx))
    out = np.full((len(items), dim), np.nan, dtype=np.float64)
    for idx, emb in gathered:
        if len(idx):
            out[np.asarray(idx)] = emb
    if np.isnan(out).any():
        raise DatasetError("gathering embeddings across processes left images without an embedding")
    return out


def _similarities(emb: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines ``[R, 3, 3]`` between rows' image indices ``a[r, i]`` and ``b[r, j]`` (-1 -> NaN)."""
    padded = np.concatenate([emb, np.full((1, emb.shape[1]), np.nan)], axis=0)  # index -1 -> NaN row
    return np.einsum("rid,rjd->rij", padded[a], padded[b])


def similarity_table(
    dataset: Iterable["Sample"],
    embed_fn: EmbedFn | Scorer,
    *,
    use_masks: bool = False,
    sources: Sequence[str] | None = None,
    batch_size: int = 32,
    benchmark: Benchmark = "ssr",
    progress: bool = True,
    mask_mode: MaskMode = "attention",
    mask_keep: MaskKeep = "foreground",
) -> SimilarityTable:
    """Per-(sample, source) similarities of one scorer over a dataset.

    Each distinct image (content key, plus mask key when ``use_masks``) is embedded once.

    Args:
        dataset: :class:`~comfy_nearid.data.Sample` iterable (a reader, or a list).
        embed_fn: a :data:`EmbedFn` or a :class:`Scorer` (whose settings then win).
        use_masks: use each image's own object mask (a distractor without one: its view's).
        mask_mode, mask_keep: how masks are used, see :func:`embed_images`.
        sources: distractor sources to evaluate (default: every source of each sample).
        batch_size: images per ``embed_fn`` call.
        benchmark: ``"mtg"`` also fills the oracle column from the part/object masks.
        progress: show progress bars.

    Returns:
        The table; ``table.images`` holds the rows' ``ImageRef``s for the report.
    """
    scorer = (embed_fn if isinstance(embed_fn, Scorer)
              else Scorer("scorer", embed_fn, use_masks, batch_size, mask_mode=mask_mode, mask_keep=mask_keep))
    plan = _plan(dataset, use_masks=scorer.use_masks, sources=sources, benchmark=benchmark, progress=progress)
    logger.info("%s: %d distinct images for %d image slots in %d rows",
                scorer.name, len(plan.items), plan.n_slots, len(plan.ids))
    if not plan.items:
        raise DatasetError("the samples to evaluate hold no images (every view and distractor is missing)")
    emb = _embed_distributed(plan.items, scorer, progress)
    views = np.asarray(plan.view_idx, dtype=np.int64)
    dists = np.asarray(plan.distractor_idx, dtype=np.int64)
    view_sims = _similarities(emb, views, views)
    diag = np.arange(N_VIEWS)
    view_sims[:, diag, diag] = np.nan  # a view against itself is not a pair
    distractor_sims = _similarities(emb, dists, dists)
    distractor_sims[:, diag, diag] = np.nan
    table = SimilarityTable(
        ids=plan.ids,
        categories=plan.categories,
        sources=plan.sources,
        view_sims=view_sims,
        cross_sims=_similarities(emb, views, dists),
        distractor_sims=distractor_sims,
        oracle=np.asarray(plan.oracle, dtype=np.float64),
        images=plan.images,
    )
    table.info.update(n_images_embedded=len(plan.items), n_image_slots=plan.n_slots)
    return table


# --------------------------------------------------------------------------- metrics


