"""Evaluate identity scorers: dataset or CSV -> per-sample similarity table -> metrics.

Three layers, kept apart (as pytorch-fid / clean-fid do):

1. embedding: every distinct image of the dataset (views and distractors, deduplicated by
   content key, optionally with its mask) is embedded exactly once, in batches, with a
   progress bar; with ``accelerate launch`` the distinct images are split across processes
   and the embeddings gathered;
2. similarities: :func:`similarity_table` turns the embeddings into one
   :class:`~comfy_nearid.metrics.table.SimilarityTable` row per (sample, distractor source),
   the same table the reference CSV format holds (:func:`read_similarity_csv`);
3. metrics: :func:`summarize_ssr` / :func:`summarize_mtg` (pure numpy, see
   :mod:`comfy_nearid.metrics`), :func:`format_table` for a Table-1-style Markdown table.

A scorer is anything that maps a batch of PIL images (and optionally their object masks) to
``[N, D]`` embeddings; similarities are cosines. :func:`model_scorer` builds one from a
``head:PATH`` / ``pooled:BACKBONE`` / ``mean:BACKBONE`` spec, :func:`feature_scorer` a
hand-made one (``feature:background`` / ``feature:object``) that checks the protocol itself.
Model scorers can read and fill the shared
:class:`~comfy_nearid.embedding_cache.EmbeddingCache`: re-evaluating a dataset with the same
model then runs no forward pass.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import DatasetError, InvalidInputError
from .metrics.mtg import mtg_alignment
from .metrics.ssr import bootstrap_ci, grouped_stats, grouped_stats_dict, ssr_stats
from .metrics.table import N_VIEWS, SimilarityTable, read_similarity_csv

if TYPE_CHECKING:
    from .data.sample import ImageRef, Sample
    from .embedding_cache import EmbeddingCache
    from .model import IdentityModel

__all__ = [
    "Benchmark",
    "EmbedFn",
    "EvalResult",
    "Scorer",
    "csv_result",
    "embed_images",
    "embedding_scorer",
    "evaluate_dataset",
    "evaluate_table",
    "feature_scorer",
    "format_breakdown",
    "region_features",
    "format_table",
    "model_scorer",
    "parse_scorer_spec",
    "similarity_table",
    "summarize_mtg",
    "summarize_ssr",
]

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
        use_masks: pass object masks to ``embed_fn`` (views' and distractors' own masks).
        batch_size: images per ``embed_fn`` call.
        identity: provenance string (model identity, feature name) recorded in the summary.
        cache_path: the embedding cache file the scorer reads and fills, or ``None``.
    """

    name: str
    embed_fn: EmbedFn
    use_masks: bool = False
    batch_size: int = 32
    identity: str = ""
    cache_path: str | None = None


# --------------------------------------------------------------------------- planning


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
) -> np.ndarray:
    """Embed ``(image, mask)`` refs in batches; returns ``[N, D]`` float64 unit vectors.

    Raises:
        InvalidInputError: ``embed_fn`` returned a wrong shape, or an all-zero / non-finite
            embedding (no direction, so no cosine), naming the image.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    chunks: list[np.ndarray] = []
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            images = [ref.load() for ref, _ in batch]
            masks = [None if m is None else m.load() for _, m in batch] if use_masks else None
            chunks.append(_to_numpy(embed_fn(images, masks), len(batch)))
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
    """(rank, world size) from the launcher's environment (``accelerate launch``/torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _embed_distributed(items: Sequence[tuple["ImageRef", "ImageRef | None"]], scorer: Scorer, progress: bool) -> np.ndarray:
    """Embed on every process a strided share of the distinct images and gather all of them."""
    rank, world = _world()
    if world <= 1:
        return embed_images(items, scorer.embed_fn, use_masks=scorer.use_masks,
                            batch_size=scorer.batch_size, progress=progress, desc=f"embedding ({scorer.name})")
    import torch
    from accelerate import PartialState  # lazy: only when launched on several processes
    from accelerate.utils import gather_object

    # without CUDA, `accelerate launch --multi_gpu` processes must be told to use gloo on CPU
    state = PartialState(cpu=not torch.cuda.is_available())
    share = list(range(state.process_index, len(items), state.num_processes))
    logger.info("process %d/%d embeds %d of %d distinct images", state.process_index, state.num_processes,
                len(share), len(items))
    local = embed_images([items[i] for i in share], scorer.embed_fn, use_masks=scorer.use_masks,
                         batch_size=scorer.batch_size, progress=progress and state.is_main_process,
                         desc=f"embedding ({scorer.name}, {state.num_processes} processes)")
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
) -> SimilarityTable:
    """Per-(sample, source) similarities of one scorer over a dataset.

    Each distinct image (content key, plus mask key when ``use_masks``) is embedded once.

    Args:
        dataset: :class:`~comfy_nearid.data.Sample` iterable (a reader, or a list).
        embed_fn: a :data:`EmbedFn` or a :class:`Scorer` (whose settings then win).
        use_masks: give ``embed_fn`` each image's own object mask.
        sources: distractor sources to evaluate (default: every source of each sample).
        batch_size: images per ``embed_fn`` call.
        benchmark: ``"mtg"`` also fills the oracle column from the part/object masks.
        progress: show progress bars.

    Returns:
        The table; ``table.images`` holds the rows' ``ImageRef``s for the report.
    """
    scorer = embed_fn if isinstance(embed_fn, Scorer) else Scorer("scorer", embed_fn, use_masks, batch_size)
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


def summarize_ssr(table: SimilarityTable, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """NearID protocol summary of a table (pooled over sources), JSON-ready.

    Returns:
        ``{"ssr", "pa", "pa_reference", "n_samples", "n_trials", "n_rows", "ci95": {"ssr":
        [lo, hi], "pa": [...], "pa_reference": [...], "n_resamples", "seed"}, "by_source":
        {source: {...}}, "by_category": {category: {...}}}``; rates in percent.

    Raises:
        DatasetError: no row has a valid margin.
    """
    margins = table.margins()
    pooled = ssr_stats(margins)
    ci = bootstrap_ci(margins, n_resamples=n_resamples, seed=seed) if n_resamples > 0 else {}
    summary: dict[str, Any] = {
        "ssr": pooled.ssr,
        "pa": pooled.pa,
        "pa_reference": pooled.pa_reference,
        "n_samples": pooled.n_samples,
        "n_trials": pooled.n_trials,
        "n_successes": pooled.n_successes,
        "n_wins": pooled.n_wins,
        "n_rows": len(table),
        "ci95": {k: list(v) for k, v in ci.items()} | {"n_resamples": n_resamples, "seed": seed},
        "by_source": grouped_stats_dict(grouped_stats(margins, table.sources)),
        "by_category": grouped_stats_dict(grouped_stats(margins, table.categories)),
    }
    summary.update(table.info)
    return summary


def summarize_mtg(table: SimilarityTable, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """MTG summary: the SSR summary (two views, edited copies as distractors) plus MO, MOpair.

    ``mo``/``mopair``/``r`` are null when the table has no oracle values (no masks).
    """
    summary = summarize_ssr(table, n_resamples=n_resamples, seed=seed)
    cross = table.cross_sims
    if np.isfinite(table.oracle[:, :2]).any():
        align = mtg_alignment(
            s_1_1p=cross[:, 0, 0], s_2_2p=cross[:, 1, 1], s_1_2p=cross[:, 0, 1], s_2_1p=cross[:, 1, 0],
            oracle_1=table.oracle[:, 0], oracle_2=table.oracle[:, 1],
        )
        summary.update(mo=_finite_or_none(align.mo), mopair=_finite_or_none(align.mopair),
                       r={k: _finite_or_none(v) for k, v in align.r.items()}, n_alignment_samples=align.n_samples)
    else:
        logger.warning("MTG table has no oracle values (object and part masks): MO and MOpair are not computed")
        summary.update(mo=None, mopair=None, r=None, n_alignment_samples=0)
    return summary


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@dataclass
class EvalResult:
    """One scorer on one benchmark.

    Attributes:
        name: scorer name (table row).
        benchmark: ``"ssr"`` (NearID protocol) or ``"mtg"``.
        summary: JSON-ready metrics (see :func:`summarize_ssr` / :func:`summarize_mtg`).
        table: the per-sample similarity table the metrics come from.
        config: how the result was made (scorer identity, CSV path, options).
    """

    name: str
    benchmark: Benchmark
    summary: dict[str, Any]
    table: SimilarityTable
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Per-sample rows: similarities, margins, counts (the per-sample CSV's content)."""
        return self.table.rows()


def evaluate_table(
    name: str,
    table: SimilarityTable,
    *,
    benchmark: Benchmark = "ssr",
    n_resamples: int = 1000,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Metrics of an already computed similarity table (CSV or model path alike)."""
    if benchmark not in ("ssr", "mtg"):
        raise InvalidInputError(f"benchmark must be 'ssr' or 'mtg', got {benchmark!r}")
    summarize = summarize_mtg if benchmark == "mtg" else summarize_ssr
    return EvalResult(name=name, benchmark=benchmark, table=table,
                      summary=summarize(table, n_resamples=n_resamples, seed=seed), config=dict(config or {}))


def csv_result(
    name: str, path: str | Path, *, benchmark: Benchmark = "ssr", n_resamples: int = 1000, seed: int = 0
) -> EvalResult:
    """Read a reference-format similarity CSV and compute its metrics."""
    # a reference CSV holds one distractor set without naming it: its rows form one source
    table = read_similarity_csv(path, default_source="all" if benchmark == "ssr" else "mtg")
    return evaluate_table(name, table, benchmark=benchmark, n_resamples=n_resamples, seed=seed,
                          config={"csv": str(path)})


def evaluate_dataset(
    scorers: Sequence[Scorer] | Mapping[str, EmbedFn] | Scorer,
    dataset: Iterable["Sample"],
    *,
    benchmark: Benchmark = "ssr",
    sources: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> list[EvalResult]:
    """Evaluate several scorers on one dataset; one :class:`EvalResult` per scorer, in order.

    Args:
        scorers: :class:`Scorer` objects, or ``{name: embed_fn}`` (no masks, batch 32).
        dataset: a reader or a list of samples; materialised once so that every scorer
            sees the same samples.
        benchmark: ``"ssr"`` or ``"mtg"``.
        sources: restrict distractor sources.
        n_resamples, seed: bootstrap settings (``n_resamples=0`` skips the CIs).
    """
    if isinstance(scorers, Scorer):
        scorers = [scorers]
    elif isinstance(scorers, Mapping):
        scorers = [Scorer(name, fn) for name, fn in scorers.items()]
    if not scorers:
        raise InvalidInputError("evaluate_dataset needs at least one scorer")
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"scorer names must be unique, got {names}")
    samples = list(dataset)
    results = []
    for scorer in scorers:
        table = similarity_table(samples, scorer, sources=sources, benchmark=benchmark, progress=progress)
        config = {"scorer": scorer.name, "identity": scorer.identity, "use_masks": scorer.use_masks,
                  "batch_size": scorer.batch_size, "sources": None if sources is None else list(sources),
                  "cache": scorer.cache_path}
        results.append(evaluate_table(scorer.name, table, benchmark=benchmark,
                                      n_resamples=n_resamples, seed=seed, config=config))
    return results


# --------------------------------------------------------------------------- tables


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _corr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: Sequence[EvalResult] | Mapping[str, EvalResult]) -> str:
    """One Markdown table in the layout of the paper's Table 1, one row per scorer.

    Results of the same scorer name on different benchmarks share a row: NearID columns
    (SSR, PA, reference PA, SSR 95% CI, samples) and/or MTG columns (MO, MOpair, SSR, PA).
    """
    results = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not results:
        raise InvalidInputError("format_table needs at least one result")
    by_name: dict[str, dict[str, EvalResult]] = {}
    for r in results:
        by_name.setdefault(r.name, {})[r.benchmark] = r
    kinds = [k for k in ("ssr", "mtg") if any(k in v for v in by_name.values())]
    header = ["scorer"]
    if "ssr" in kinds:
        header += ["NearID SSR", "NearID PA", "PA (ref.)", "SSR 95% CI", "samples"]
    if "mtg" in kinds:
        header += ["MTG MO", "MTG MOpair", "MTG SSR", "MTG PA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_kind in by_name.items():
        cells = [name]
        if "ssr" in kinds:
            s = per_kind.get("ssr")
            if s is None:
                cells += ["-"] * 5
            else:
                ci = s.summary.get("ci95", {}).get("ssr")
                cells += [_pct(s.summary["ssr"]), _pct(s.summary["pa"]), _pct(s.summary["pa_reference"]),
                          f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-", str(s.summary["n_samples"])]
        if "mtg" in kinds:
            m = per_kind.get("mtg")
            if m is None:
                cells += ["-"] * 4
            else:
                cells += [_corr(m.summary.get("mo")), _corr(m.summary.get("mopair")),
                          _pct(m.summary["ssr"]), _pct(m.summary["pa"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_breakdown(results: Sequence[EvalResult], by: Literal["source", "category"] = "source") -> str:
    """Markdown table of SSR / PA per distractor source (or category), one row per scorer."""
    key = f"by_{by}"
    results = [r for r in results if key in r.summary]
    if not results:
        raise InvalidInputError("format_breakdown needs at least one result with a breakdown")
    labels = list(dict.fromkeys(label for r in results for label in r.summary[key]))
    header = ["scorer"] + [f"{label} SSR / PA" for label in labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [f"{r.name} ({r.benchmark})"]
        for label in labels:
            g = r.summary[key].get(label)
            cells.append("-" if not g or g["ssr"] is None else f"{g['ssr']:.2f} / {g['pa']:.2f} (n={g['n_samples']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- scorers


def parse_scorer_spec(spec: str) -> tuple[str, str]:
    """``"KIND:ARG"`` -> ``(kind, arg)``; kinds: head, pooled, mean, feature."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg or kind not in ("head", "pooled", "mean", "feature"):
        raise InvalidInputError(
            f"scorer spec {spec!r}: expected head:PATH.safetensors, pooled:BACKBONE, mean:BACKBONE "
            "or feature:background|object"
        )
    return kind, arg


def model_scorer(
    spec: str,
    *,
    name: str | None = None,
    device: str | None = None,
    batch_size: int = 32,
    use_masks: bool = False,
    pretrained: bool = True,
    cache: "EmbeddingCache | None" = None,
) -> Scorer:
    """Build a :class:`Scorer` from a spec through :func:`comfy_nearid.load_model`.

    ``head:PATH`` = a NearID head file (its backbone from the metadata); ``pooled:BACKBONE``
    = the frozen backbone read out through its own pooling (SigLIP's MAP head);
    ``mean:BACKBONE`` = the backbone's mean-pooled tokens; ``feature:...`` =
    :func:`feature_scorer` (cheap, never cached). ``pretrained=False`` builds random weights
    (tests, benchmarks). ``cache``: see :func:`embedding_scorer`.
    """
    kind, arg = parse_scorer_spec(spec)
    if kind == "feature":
        return feature_scorer(arg, name=name or spec, batch_size=batch_size)
    from . import load_model  # lazy: the CSV path and `nearid eval human` need no torch

    if kind == "head":
        model = load_model(head=arg, device=device, pretrained=pretrained)
    else:
        model = load_model(backbone=arg, readout=kind, device=device, pretrained=pretrained)
    return embedding_scorer(model, name=name or spec, batch_size=batch_size, use_masks=use_masks, cache=cache)


def embedding_scorer(
    model: "IdentityModel",
    *,
    name: str,
    batch_size: int = 32,
    use_masks: bool = False,
    cache: "EmbeddingCache | None" = None,
) -> Scorer:
    """A :class:`Scorer` over a loaded :class:`~comfy_nearid.model.IdentityModel`.

    With a ``cache``, embeddings go through :func:`~comfy_nearid.embedding_cache.cached_embed`:
    keyed by the model's cache identity and the decoded pixels (plus the mask when masks are
    used), so a second evaluation of the same data with the same model runs no forward pass
    (images are still decoded to compute their keys), and another model never reads these
    entries. Several processes may share one cache file.
    """
    from .embedding_cache import cached_embed, model_cache_identity

    def embed(images: list[Image.Image], masks: list[Image.Image | None] | None) -> Any:
        if masks is not None and any(m is None for m in masks):
            if not all(m is None for m in masks):
                raise InvalidInputError(f"scorer {name}: some images of a batch have masks and some do not")
            masks = None
        return cached_embed(model, images, cache, masks=masks, batch_size=len(images))

    return Scorer(name=name, embed_fn=embed, use_masks=use_masks, batch_size=batch_size,
                  identity=model_cache_identity(model), cache_path=None if cache is None else str(cache.path))


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
