"""Frozen-feature cache: every image's patch tokens, embedded once, memory-mapped from disk.

The backbone is frozen, so its tokens for an image never change during training; embedding
each image once turns an epoch's cost from the backbone's compute into the head's. Layout of
a cache folder::

    index.json          identity (backbone, weights hash, preprocessing, dtype, token shape),
                        the image keys in row order, and the shard list. Written last, by
                        rename: a crash while building leaves the previous index intact.
    tokens-00000.npy    [rows, N, D] tokens (float16 by default), memory-mapped .npy
    masks-00000.npy     [rows, N] bool token masks from the image's object mask (all True
                        when the image has none), for foreground masking
    ...                 one more shard pair each time images are added

Rows are keyed by :attr:`ImageRef.key` (content hash of the encoded image), so identical files
share a row and renaming a dataset folder does not invalidate the cache. A cache made by
another backbone, other weights or other preprocessing is refused, naming both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from comfy_nearid.data.base import NearIDDataset
from comfy_nearid.data.sample import ImageRef
from comfy_nearid.errors import ConfigError, DatasetError

from .data import DatasetLayout, ImageSlot

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = "nearid-feature-cache"
FORMAT_VERSION = 1
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}

__all__ = ["CacheIdentity", "FeatureCache", "SlotRows", "backbone_fingerprint", "cache_identity", "prepare_cache"]


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the backbone's weights, names and shapes."""
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheIdentity:
    """What made the tokens: any difference means the tokens are not interchangeable."""

    backbone: str
    weights: str
    preprocess: str
    num_tokens: int
    dim: int
    dtype: str
    tokens: int = 1  # the backbone's token_version (indexes written before it existed hold 1)

    def differences(self, other: "CacheIdentity") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: cache has {theirs[k]!r}, run needs {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


def cache_identity(model: Any, dtype: str) -> CacheIdentity:
    """The identity of tokens produced by ``model`` (an :class:`IdentityModel`) at ``dtype``."""
    spec = model.spec
    return CacheIdentity(
        backbone=spec.name,
        weights=backbone_fingerprint(model.backbone),
        preprocess=model.preprocess.describe(),
        num_tokens=spec.num_tokens,
        dim=spec.embed_dim,
        dtype=dtype,
        tokens=spec.token_version,
    )


class SlotRows:
    """Cache rows of the image slots of one reader: ``views[i, k]`` and
    ``distractors[source][i, k]`` for the sample at reader position ``i`` (-1 = not cached)."""

    def __init__(self, n_samples: int, n_views: int, sources: Sequence[str]) -> None:
        self.views = np.full((n_samples, n_views), -1, dtype=np.int64)
        self.distractors = {s: np.full((n_samples, n_views), -1, dtype=np.int64) for s in sources}

    def __call__(self, sample_index: int, slot: ImageSlot) -> int:
        table = self.views if slot.source is None else self.distractors[slot.source]
        row = int(table[sample_index, slot.view])
        if row < 0:
            raise DatasetError(f"sample at position {sample_index}: slot {slot} has no row in the feature cache")
        return row


class FeatureCache:
    """An opened cache folder (read side). Shards are memory-mapped lazily in each process."""

    def __init__(self, directory: Path, identity: CacheIdentity, keys: list[str], shards: list[dict[str, Any]]) -> None:
        self.directory = directory
        self.identity = identity
        self.keys = keys
        self.row_of = {k: i for i, k in enumerate(keys)}
        self.shards = shards
        self._starts = np.cumsum([0] + [int(s["rows"]) for s in shards])
        self._tokens: list[np.ndarray] | None = None
        self._masks: list[np.ndarray] | None = None

    # Memory maps are not pickled into DataLoader workers; each process maps the files itself.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokens"] = None
        state["_masks"] = None
        return state

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def open(cls, directory: str | Path) -> "FeatureCache | None":
        """Open ``directory`` (None when it holds no cache yet)."""
        directory = Path(directory)
        index_path = directory / INDEX_NAME
        if not index_path.is_file():
            return None
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            if index.get("format") != FORMAT:
                raise ConfigError(f"{index_path} is not a NearID feature cache index (format {index.get('format')!r})")
            identity = CacheIdentity(**index["identity"])
            keys = list(index["keys"])
            shards = list(index["shards"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"feature cache index {index_path} is unreadable: {e}; delete the folder to rebuild") from e
        if sum(int(s["rows"]) for s in shards) != len(keys):
            raise ConfigError(f"feature cache {directory}: shard rows do not add up to the {len(keys)} keys")
        return cls(directory, identity, keys, shards)

    def _maps(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._tokens is None or self._masks is None:
            self._tokens = [np.load(self.directory / s["tokens"], mmap_mode="r") for s in self.shards]
            self._masks = [np.load(self.directory / s["masks"], mmap_mode="r") for s in self.shards]
        return self._tokens, self._masks

    def read(self, rows: "Sequence[int] | np.ndarray") -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[*rows.shape, N, D]`` and token masks ``[*rows.shape, N]`` (bool) of the
        cache rows ``rows`` (any shape, e.g. ``[S]`` for one example or ``[B, S]`` for a batch);
        row -1 gives zeros and an all-True mask (a masked slot).

        Tokens keep the cache's dtype. Rows are read in file order (sorted, so the memory map is
        read sequentially), each copied once, straight into its place in the output (no zero
        fill of the whole output, no gathered temporary).
        """
        tokens_maps, mask_maps = self._maps()
        rows = np.asarray(rows, dtype=np.int64)
        n, d = self.identity.num_tokens, self.identity.dim
        flat = rows.reshape(-1)
        tokens = np.empty((flat.size, n, d), dtype=_NP_DTYPES[self.identity.dtype])
        masks = np.ones((flat.size, n), dtype=bool)
        missing = flat < 0
        if missing.any():
            tokens[missing] = 0
        hit = np.flatnonzero(~missing)
        if hit.size:
            if int(flat[hit].max()) >= len(self.keys):
                raise DatasetError(f"feature cache {self.directory}: row {int(flat[hit].max())} is past its {len(self.keys)} rows")
            order = hit[np.argsort(flat[hit], kind="stable")]
            shard_of = np.searchsorted(self._starts, flat[order], side="right") - 1
            for shard in np.unique(shard_of):
                where = order[shard_of == shard]
                local = flat[where] - int(self._starts[shard])
                shard_tokens = tokens_maps[shard]
                for position, row in zip(where.tolist(), local.tolist()):
                    tokens[position] = shard_tokens[row]  # one copy per row, no temporary
                masks[where] = mask_maps[shard][local]
        return (
            torch.from_numpy(tokens).reshape(*rows.shape, n, d),
            torch.from_numpy(masks).reshape(*rows.shape, n),
        )

    def nbytes_per_row(self) -> int:
        return self.identity.num_tokens * self.identity.dim * np.dtype(_NP_DTYPES[self.identity.dtype]).itemsize


def _write_index(directory: Path, identity: CacheIdentity, keys: list[str], shards: list[dict[str, Any]]) -> None:
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": asdict(identity),
        "keys": keys,
        "shards": shards,
    }
    tmp = directory / f".{INDEX_NAME}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / INDEX_NAME)  # the commit point of a build


@dataclass
class _PendingImage:
    key: str
    ref: ImageRef
    mask: ImageRef | None


def _collect(
    dataset: NearIDDataset, layout: DatasetLayout, pending: dict[str, _PendingImage]
) -> list[tuple[int, ImageSlot, str]]:
    """Every image slot of the layout's samples: (reader position, slot, key); adds unseen keys
    to ``pending``."""
    out: list[tuple[int, ImageSlot, str]] = []
    for s in layout.samples:
        sample = dataset[s.index]
        slots = [ImageSlot(k) for k in s.views]
        slots += [ImageSlot(k, src) for src, views in s.distractors.items() for k in views]
        for slot in slots:
            ref = slot.ref(sample)
            if ref is None:
                continue
            key = ref.key
            if key not in pending:
                pending[key] = _PendingImage(key, ref, slot.mask_ref(sample))
            out.append((s.index, slot, key))
    return out


def _embed_into(
    model: Any,
    images: list[_PendingImage],
    tokens_out: np.ndarray,
    masks_out: np.ndarray,
    batch_size: int,
    progress: bool,
    decode_threads: int = 2,
    cores: int | None = None,
) -> None:
    """Embed ``images`` in batches into the memory maps (row ``i`` = ``images[i]``).

    On a CPU, ``cores`` (default: torch's thread count) threads each decode and embed whole
    batches of their own (:func:`comfy_nearid.prefetch.batches_on_cores`); on a GPU, or with
    ``cores=1``, the next batches' images and masks are decoded in ``decode_threads`` threads
    while the backbone runs (:func:`comfy_nearid.prefetch.prefetch`). Each image's tokens are
    the same either way up to the backbone's float rounding (one thread or several per
    operator); the batches are the same ``batch_size`` runs of ``images``."""
    import torch

    from comfy_nearid.model import mask_token_grid
    from comfy_nearid.prefetch import batches_on_cores, cores_for, prefetch

    side = model.spec.image_size

    def prepare(im: _PendingImage, out: "torch.Tensor") -> "np.ndarray | None":
        model.preprocess(im.ref.load(), out=out)
        return None if im.mask is None else mask_token_grid(im.mask.load(), model.spec).numpy()

    def tokens_of(pixels: "torch.Tensor") -> np.ndarray:
        return model.tokens(pixels).cpu().numpy().astype(tokens_out.dtype)

    def embed(chunk: Sequence[_PendingImage]) -> tuple[np.ndarray, list["np.ndarray | None"]]:
        pixels = torch.empty(len(chunk), 3, side, side)
        masks = [prepare(im, out=row) for im, row in zip(chunk, pixels)]
        return tokens_of(pixels), masks

    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    if cores is None or model.device.type != "cpu":  # a GPU is fed by decode threads, whatever was asked
        cores = cores_for(model.device)
    if cores > 1:
        embedded: Iterable[tuple[Sequence[_PendingImage], tuple[np.ndarray, list[Any]]]] = batches_on_cores(
            embed, batches, cores)
    else:
        embedded = ((chunk, (tokens_of(pixels), masks))
                    for chunk, masks, pixels in prefetch(prepare, batches, decode_threads, depth=2,
                                                         pixel_buffer=lambda n: torch.empty(n, 3, side, side)))
    bar = tqdm(total=len(images), desc="feature cache", unit="img", disable=not progress)
    start = 0
    for chunk, (tokens, masks) in embedded:
        tokens_out[start : start + len(chunk)] = tokens
        for i, mask in enumerate(masks):
            if mask is not None:
                masks_out[start + i] = mask
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()


def prepare_cache(
    directory: str | Path,
    model: Any,
    dtype: str,
    readers: Sequence[tuple[NearIDDataset, DatasetLayout]],
    batch_size: int = 64,
    max_gb: float = 64.0,
    progress: bool = True,
) -> tuple[FeatureCache, list[SlotRows]]:
    """Open (or build, or extend) the cache in ``directory`` for every image of ``readers``.

    Returns the cache and, per reader, the :class:`SlotRows` mapping its slots to cache rows.
    Raises :class:`ConfigError` when the folder holds a cache with another identity (naming
    both) or when the new tokens would exceed ``max_gb``.
    """
    directory = Path(directory)
    identity = cache_identity(model, dtype)
    existing = FeatureCache.open(directory)
    if existing is not None:
        diff = identity.differences(existing.identity)
        if diff:
            raise ConfigError(
                f"feature cache {directory} was made by another backbone or preprocessing "
                f"({'; '.join(diff)}); use another features.cache_dir or delete this folder"
            )
    keys = list(existing.keys) if existing is not None else []
    shards = list(existing.shards) if existing is not None else []

    pending: dict[str, _PendingImage] = {}
    per_reader = [_collect(ds, layout, pending) for ds, layout in readers]
    known = set(keys)
    new_images = [im for k, im in pending.items() if k not in known]

    if new_images:
        row_bytes = identity.num_tokens * identity.dim * np.dtype(_NP_DTYPES[dtype]).itemsize
        gigabytes = row_bytes * len(new_images) / 1e9
        if gigabytes > max_gb:
            raise ConfigError(
                f"the feature cache would need {gigabytes:.1f} GB for {len(new_images)} images "
                f"({identity.num_tokens} tokens x {identity.dim} x {dtype}), above features.max_cache_gb="
                f"{max_gb:g}; raise the limit or train through the backbone (features.cache=false)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        shard_id = len(shards)
        names = {"tokens": f"tokens-{shard_id:05d}.npy", "masks": f"masks-{shard_id:05d}.npy"}
        logger.info("embedding %d images into feature cache %s (%.2f GB)", len(new_images), directory, gigabytes)
        tokens_map = np.lib.format.open_memmap(
            directory / names["tokens"], mode="w+", dtype=_NP_DTYPES[dtype],
            shape=(len(new_images), identity.num_tokens, identity.dim),
        )
        masks_map = np.lib.format.open_memmap(
            directory / names["masks"], mode="w+", dtype=np.bool_, shape=(len(new_images), identity.num_tokens)
        )
        masks_map[:] = True
        _embed_into(model, new_images, tokens_map, masks_map, batch_size, progress)
        tokens_map.flush()
        masks_map.flush()
        del tokens_map, masks_map
        shards.append({**names, "rows": len(new_images)})
        keys.extend(im.key for im in new_images)
        _write_index(directory, identity, keys, shards)
    cache = FeatureCache.open(directory) if (new_images or existing is not None) else None
    if cache is None:  # nothing to embed and no cache yet: an empty dataset slipped through
        raise DatasetError("the feature cache has no image to hold (empty datasets)")

    tables: list[SlotRows] = []
    for (ds, layout), entries in zip(readers, per_reader):
        n_views = max(max(s.views) + 1 for s in layout.samples)
        table = SlotRows(len(ds), n_views, layout.sources)
        for index, slot, key in entries:
            target = table.views if slot.source is None else table.distractors[slot.source]
            target[index, slot.view] = cache.row_of[key]
        tables.append(table)
    return cache, tables


def rows_in_use(tables: Iterable[SlotRows]) -> int:
    """Number of distinct cache rows referenced by ``tables``."""
    rows: set[int] = set()
    for t in tables:
        rows.update(int(r) for r in t.views[t.views >= 0].ravel())
        for d in t.distractors.values():
            rows.update(int(r) for r in d[d >= 0].ravel())
    return len(rows)
