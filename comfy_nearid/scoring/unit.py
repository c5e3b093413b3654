"""The engine-agnostic scoring unit: a batch of image refs + the subjects' reference
embeddings -> score rows (the columns of ``nearid score``).

The local streaming scorer (:func:`~comfy_nearid.scoring.run.score_plan`), the partition
runner (:mod:`comfy_nearid.scoring.partitions`) and the Ray adapter (:mod:`comfy_nearid.ray`)
all score through :class:`ScoringUnit`, so decoding, preprocessing, embedding, the reference
combination and the calibrated match are the same code whichever engine runs them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import InvalidInputError
from .combine import REFERENCE_COMBINATIONS
from .rows import ScoreRow
from ..prefetch import prefetch
from .run import ImageHook, _embed_batch, _fill_calibration, _ItemPreparer, _make_row, _Prepared

if TYPE_CHECKING:
    import torch

    from ..embedding_cache import EmbeddingCache
    from ..model import IdentityModel

logger = logging.getLogger(__name__)


def embed_references(
    model: "IdentityModel", references: Mapping[str, Sequence[str | Path]],
    cache: "EmbeddingCache | None" = None, batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Subject name -> its reference embeddings ``[R, D]`` float32, embedded once (through the
    cache). On a cluster the driver calls this and ships the result to every worker.

    Raises:
        ImageLoadError: a reference cannot be read.
    """
    from ..embedding_cache import cached_embed

    return {name: cached_embed(model, [Path(p) for p in refs], cache, batch_size=batch_size).numpy().astype(np.float32)
            for name, refs in references.items()}


@dataclass(frozen=True)
class ImageRef:
    """One image to score for one subject.

    ``path`` is what the row's ``path`` column holds: the file path for folder inputs, the
    sample key for shards. ``data`` holds the encoded image bytes when the reader already has
    them (parquet, webdataset); ``None`` means "read the file at ``path``". ``error`` marks a
    sample the reader found unusable (no image in it), which becomes an error row.
    """

    path: str
    subject: str
    data: bytes | None = None
    error: str | None = None


class ScoringUnit:
    """Scores batches of images against fixed reference embeddings with one loaded model.

    Args:
        model: the identity model (``preprocess``, ``embed_pixels``).
        references: subject name -> unit reference embeddings ``[R, D]`` float32, computed
            once by the caller (the driver, for a cluster) and never recomputed here.
        aggregate: how the R cosines combine (``mean``, ``max``, ``prototype``).
        cache: optional embedding cache (local runs; actors on a cluster run without one).
        on_decoded: called in the decode threads with each image read (the report's thumbnails).
    """

    def __init__(
        self,
        model: "IdentityModel",
        references: Mapping[str, np.ndarray],
        aggregate: str = "mean",
        cache: "EmbeddingCache | None" = None,
        on_decoded: ImageHook | None = None,
    ) -> None:
        from ..embedding_cache import model_cache_identity

        if aggregate not in REFERENCE_COMBINATIONS:
            raise InvalidInputError(f"aggregate must be one of {REFERENCE_COMBINATIONS}, got {aggregate!r}")
        self.model = model
        self.references = {name: np.asarray(emb, dtype=np.float32) for name, emb in references.items()}
        self.aggregate = aggregate
        self.cache = cache
        self.identity = model_cache_identity(model)
        self._preparer = _ItemPreparer(model.preprocess, cache, self.identity, on_decoded)

    def prepare(self, ref: Any, out: "torch.Tensor | None" = None) -> _Prepared:
        """Read/decode/preprocess one item (thread-safe; runs in the decode threads); its pixels
        go into ``out`` (a row of the batch's buffer, :meth:`pixel_buffer`) when given."""
        if isinstance(ref, ImageRef):
            if ref.error is not None:
                return _Prepared(error=ref.error)
            if ref.subject not in self.references:
                return _Prepared(error=f"subject {ref.subject!r} has no references "
                                       f"(known: {sorted(self.references)[:5]})")
        return self._preparer(ref, out=out)

    def pixel_buffer(self, count: int) -> "torch.Tensor":
        """An uninitialised float32 ``[count, 3, S, S]`` batch the decode threads fill in place
        (page-locked on CUDA, so its copy to the GPU can overlap)."""
        import torch

        size = self.model.preprocess.image_size
        return torch.empty((count, 3, size, size), dtype=torch.float32,
                           pin_memory=self.model.device.type == "cuda")

    def rows_for(self, batch: Sequence[Any], prepared: Sequence[_Prepared],
                 pixels: "torch.Tensor | None" = None) -> list[ScoreRow]:
        """Rows for a prepared batch: one forward pass for the images that need one
        (``pixels``: the batch's buffer the items were prepared into, if any)."""
        embeddings = _embed_batch(self.model, list(prepared), self.cache, self.identity, pixels)
        rows = [_make_row(item, prep, emb, self.references, self.aggregate)
                for item, prep, emb in zip(batch, prepared, embeddings)]
        _fill_calibration(self.model, rows)
        return rows

    def score(self, batch: Sequence[Any]) -> list[ScoreRow]:
        """Rows (without ranks) for one batch of :class:`ImageRef` or plan items, in order."""
        pixels = self.pixel_buffer(len(batch))
        return self.rows_for(batch, [self.prepare(ref, out=row) for ref, row in zip(batch, pixels)], pixels)

    def score_batches(
        self, batches: Iterable[Sequence[Any]], num_workers: int = 0, prefetch_batches: int = 2
    ) -> Iterator[tuple[Sequence[Any], list[ScoreRow]]]:
        """``(batch, rows)`` per batch, while ``num_workers`` threads decode ``prefetch_batches``
        batches ahead (see :func:`~comfy_nearid.scoring.run.prefetch`)."""
        for batch, prepared, pixels in prefetch(self.prepare, batches, num_workers, prefetch_batches,
                                                self.pixel_buffer):
            yield batch, self.rows_for(batch, prepared, pixels)
