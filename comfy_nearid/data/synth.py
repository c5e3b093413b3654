"""The synthetic near-identity benchmark: deterministic, offline, any size.

``generate_benchmark(out_dir, n_train, n_test)`` writes::

    ROOT/
      manifest.json                 generator version, seed, sizes, splits, categories, config
      train/<id>/                   the folder layout read by FolderDataset
        sample.json                 category, description, identity attributes, poses, edits
        view1.png view2.png view3.png   one identity, 3 poses, 3 backgrounds, mild lighting
        mask1.png mask2.png mask3.png   object masks (8-bit, antialiased; > 0 = object)
        object/distractor{k}.png, object/mask{k}.png    another instance of the category
        part/distractor{k}.png,   part/mask{k}.png      one part's shape or colour changed
        colour/distractor{k}.png, colour/mask{k}.png    only the body colour changed
      test/<id>/ ...                held-out categories, identities and background pool
      mtg_test/<id>/                MTG layout (see comfy_nearid.data.mtg)

Each distractor is drawn at its view's pose, with its lighting, on the exact same background
pixels, so outside the union of the two object masks the two images are equal bit for bit.
Every file depends only on (seed, split, identity index): generating with several worker
processes gives byte-identical output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DatasetError, InvalidInputError
from .mtg import MTG_SOURCE
from .synth_render import (
    Lighting,
    Pose,
    RenderMemo,
    RenderedObject,
    composite,
    cover_mask,
    light_background,
    object_extent,
    render_background,
    render_object,
    sample_lighting,
    sample_pose,
)
from .synth_specs import (
    LEVELS,
    ObjectSpec,
    edit_colour_level,
    edit_object_level,
    edit_one_part,
    sample_object,
    split_categories,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST_FORMAT = "comfy-nearid-synthetic-benchmark"
SPLITS = ("train", "test", "mtg_test")
_SPLIT_CODE = {"train": 1, "test": 2, "mtg_test": 3}
# Independent random streams, so that e.g. adding a level does not change the views.
_STREAM_SPEC, _STREAM_VIEW, _STREAM_DISTRACTOR, _STREAM_BACKGROUND, _STREAM_CATEGORY, _STREAM_MTG = range(6)
_LEVEL_CODE = {"object": 1, "part": 2, "colour": 3}


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines the generated files."""

    n_train: int
    n_test: int
    n_mtg: int
    image_size: int = 224
    seed: int = 0
    n_views: int = 3
    levels: tuple[str, ...] = LEVELS
    # Diameter of the disc holding the whole object (body + parts) as a fraction of the image
    # side; the object's bounding box then spans about 35-65% of the side (mean ~0.48).
    object_fill: tuple[float, float] = (0.45, 0.72)
    backgrounds_per_identity: float = 2.0  # background pool size of a split / its identity count
    png_compress_level: int = 1

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "n_mtg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.image_size, int) or not 32 <= self.image_size <= 2048:
            raise InvalidInputError(f"image_size must be an integer in 32..2048, got {self.image_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInputError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.n_views, int) or not 2 <= self.n_views <= 8:
            raise InvalidInputError(f"n_views must be an integer in 2..8, got {self.n_views!r}")
        unknown = [lv for lv in self.levels if lv not in LEVELS]
        if unknown or not self.levels or len(set(self.levels)) != len(self.levels):
            raise InvalidInputError(f"levels must be distinct names from {list(LEVELS)}, got {list(self.levels)}")
        lo, hi = self.object_fill
        if not 0.1 <= lo <= hi <= 0.95:
            raise InvalidInputError(f"object_fill must satisfy 0.1 <= low <= high <= 0.95, got {self.object_fill}")
        if not self.backgrounds_per_identity >= 1.0:
            raise InvalidInputError(
                f"backgrounds_per_identity must be >= 1.0, got {self.backgrounds_per_identity}"
            )
        if self.png_compress_level not in range(10):
            raise InvalidInputError(f"png_compress_level must be 0..9, got {self.png_compress_level}")

    def count(self, split: str) -> int:
        return {"train": self.n_train, "test": self.n_test, "mtg_test": self.n_mtg}[split]

    def background_pool(self, split: str) -> int:
        """Number of distinct background scenes of a split (views pick from this pool)."""
        views = 2 if split == "mtg_test" else self.n_views
        return max(int(math.ceil(self.count(split) * self.backgrounds_per_identity)), views, 8)

    def categories(self, split: str) -> list[str]:
        """The split's categories in a seeded order (identities cycle through them)."""
        cats = split_categories(held_out=split != "train")
        order = self.random_stream(split, _STREAM_CATEGORY).permutation(len(cats))
        return [cats[i] for i in order]

    def random_stream(self, split: str, *stream: int) -> np.random.Generator:
        """The generator of one independent random stream (seed, split, *stream)."""
        return np.random.default_rng([self.seed, _SPLIT_CODE[split], *stream])

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def sample_id(split: str, index: int) -> str:
    """Identity ids: ``train-00012``, ``test-00003``, ``mtg-00007``."""
    prefix = "mtg" if split == "mtg_test" else split
    return f"{prefix}-{index:05d}"


def background_id(split: str, index: int) -> str:
    return f"{split}-bg-{index:05d}"


@dataclass
class RenderedIdentity:
    """All images of one identity, as arrays, keyed by their path relative to the sample folder."""

    sample_id: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _ViewSetup:
    pose: Pose
    light: Lighting
    background_index: int


def _view_setups(config: SynthConfig, split: str, index: int, spec: ObjectSpec, n_views: int) -> list[_ViewSetup]:
    """Pose, lighting and a distinct background of each view."""
    pool = config.background_pool(split)
    choose = config.random_stream(split, _STREAM_VIEW, index)
    backgrounds = choose.choice(pool, size=n_views, replace=False)
    extent = object_extent(spec)
    setups = []
    for k in range(n_views):
        rng = config.random_stream(split, _STREAM_VIEW, index, k + 1)
        pose = sample_pose(rng, config.image_size, extent, config.object_fill)
        setups.append(_ViewSetup(pose, sample_lighting(rng), int(backgrounds[k])))
    return setups


def _background(config: SynthConfig, split: str, bg_index: int) -> np.ndarray:
    return render_background(config.random_stream(split, _STREAM_BACKGROUND, bg_index), config.image_size)


def _identity_spec(config: SynthConfig, split: str, index: int) -> ObjectSpec:
    cats = config.categories(split)
    return sample_object(cats[index % len(cats)], config.random_stream(split, _STREAM_SPEC, index))


def _edit(level: str, spec: ObjectSpec, rng: np.random.Generator) -> tuple[ObjectSpec, list[str]]:
    if level == "object":
        return edit_object_level(spec, rng)
    if level == "part":
        edited, part, what = edit_one_part(spec, rng)
        return edited, [f"part{part + 1}:{what}"]
    return edit_colour_level(spec, rng)


def render_identity(config: SynthConfig, split: str, index: int) -> RenderedIdentity:
    """Render every image of identity ``index`` of a NearID split ("train" or "test")."""
    if split not in ("train", "test"):
        raise InvalidInputError(f"render_identity renders 'train' or 'test' identities, got split {split!r}")
    spec = _identity_spec(config, split, index)
    size = config.image_size
    out = RenderedIdentity(sample_id(split, index))
    views_meta, distractor_meta = [], {level: [] for level in config.levels}
    for k, setup in enumerate(_view_setups(config, split, index, spec, config.n_views)):
        background = light_background(_background(config, split, setup.background_index), setup.light)
        memo = RenderMemo()  # the view and its distractors share pose and most shapes
        rgb, mask = composite(background, render_object(spec, setup.pose, setup.light, size, memo), setup.light)
        out.images[f"view{k + 1}.png"], out.images[f"mask{k + 1}.png"] = rgb, mask
        views_meta.append({"background": background_id(split, setup.background_index),
                           "pose": setup.pose.to_dict(), "lighting": setup.light.to_dict()})
        for level in config.levels:
            rng = config.random_stream(split, _STREAM_DISTRACTOR, index, _LEVEL_CODE[level], k + 1)
            edited, changed = _edit(level, spec, rng)
            rgb, mask = composite(background, render_object(edited, setup.pose, setup.light, size, memo), setup.light)
            out.images[f"{level}/distractor{k + 1}.png"], out.images[f"{level}/mask{k + 1}.png"] = rgb, mask
            distractor_meta[level].append({"changed": changed, "description": edited.describe(), "spec": edited.to_dict()})
    out.meta = {
        "id": out.sample_id,
        "category": spec.category,
        "description": spec.describe(),
        "split": split,
        "identity": spec.to_dict(),
        "views": views_meta,
        "distractors": distractor_meta,
    }
    return out


def render_mtg_identity(config: SynthConfig, index: int) -> RenderedIdentity:
    """Render one MTG-style sample: two views, the same part edited in both, and masks."""
    split = "mtg_test"
    spec = _identity_spec(config, split, index)
    edited, part, what = edit_one_part(spec, config.random_stream(split, _STREAM_MTG, index))
    size = config.image_size
    out = RenderedIdentity(sample_id(split, index))
    views_meta = []
    for k, setup in enumerate(_view_setups(config, split, index, spec, 2)):
        background = light_background(_background(config, split, setup.background_index), setup.light)
        memo = RenderMemo()
        original: RenderedObject = render_object(spec, setup.pose, setup.light, size, memo)
        changed: RenderedObject = render_object(edited, setup.pose, setup.light, size, memo)
        out.images[f"view{k + 1}.png"], out.images[f"object_mask{k + 1}.png"] = composite(background, original, setup.light)
        out.images[f"edited{k + 1}.png"], _ = composite(background, changed, setup.light)
        # The edited region: where the part is visible before or after the edit.
        out.images[f"part_mask{k + 1}.png"] = np.maximum(
            cover_mask(original.part_cover[part], original.box, size),
            cover_mask(changed.part_cover[part], changed.box, size),
        )
        views_meta.append({"background": background_id(split, setup.background_index),
                           "pose": setup.pose.to_dict(), "lighting": setup.light.to_dict()})
    out.meta = {
        "id": out.sample_id,
        "category": spec.category,
        "description": spec.describe(),
        "split": split,
        "source": MTG_SOURCE,
        "identity": spec.to_dict(),
        "edited_part": part + 1,
        "edit": what,
        "edited_description": edited.describe(),
        "edited_spec": edited.to_dict(),
        "views": views_meta,
    }
    return out


def encode_png(array: np.ndarray, compress_level: int) -> bytes:
    """Encode uint8 [H,W] (grey) or [H,W,3] (RGB) as a minimal PNG: IHDR, one IDAT, IEND.

    Every row uses the "Up" filter and zlib at ``compress_level``: no metadata, no
    timestamps, so the same array always gives the same bytes; about twice as fast as
    Pillow's encoder, which tries every filter on every row.
    """
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise InvalidInputError(f"encode_png takes uint8 [H,W] or [H,W,3], got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    rows = np.ascontiguousarray(array).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up: each byte minus the byte above it (mod 256)
    filtered[0, 0] = 0  # first row: no row above; type None
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type = 0 if array.ndim == 2 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(filtered.tobytes(), compress_level))
        + chunk(b"IEND", b"")
    )


def save_png(path: Path, array: np.ndarray, compress_level: int) -> None:
    """Write ``array`` as a PNG (see :func:`encode_png`): same array, same bytes."""
    path.write_bytes(encode_png(array, compress_level))


def write_identity(config: SynthConfig, root: Path, split: str, index: int) -> int:
    """Render identity ``index`` of ``split`` and write its folder; returns the RGB image count."""
    rendered = render_mtg_identity(config, index) if split == "mtg_test" else render_identity(config, split, index)
    sample_dir = root / split / rendered.sample_id
    count = 0
    for rel, array in rendered.images.items():
        path = sample_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(path, array, config.png_compress_level)
        count += array.ndim == 3
    (sample_dir / "sample.json").write_text(json.dumps(rendered.meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return count


def _write_task(args: tuple[SynthConfig, str, str, int]) -> int:
    config, root, split, index = args
    return write_identity(config, Path(root), split, index)


def _prepare_output(root: Path, overwrite: bool) -> None:
    """Refuse to mix with unrelated files; with ``overwrite`` remove a previous benchmark's splits."""
    manifest = root / "manifest.json"
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"output {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not manifest.is_file():
            raise InvalidInputError(f"output folder {root} is not empty and holds no synthetic benchmark; choose another")
        if not overwrite:
            raise InvalidInputError(f"output folder {root} already holds a benchmark; pass overwrite=True (--overwrite)")
        for split in SPLITS:
            if (root / split).is_dir():
                shutil.rmtree(root / split)
        manifest.unlink()
    root.mkdir(parents=True, exist_ok=True)


def build_manifest(config: SynthConfig) -> dict[str, Any]:
    """The manifest describing a generated benchmark (no timestamps: reproducible bytes)."""
    from .. import __version__

    splits: dict[str, Any] = {}
    for split in SPLITS:
        if config.count(split) == 0:
            continue
        splits[split] = {
            "count": config.count(split),
            "layout": "mtg" if split == "mtg_test" else "nearid",
            "sources": [MTG_SOURCE] if split == "mtg_test" else list(config.levels),
            "categories": sorted(config.categories(split)),
            "background_pool": config.background_pool(split),
            "views": 2 if split == "mtg_test" else config.n_views,
        }
    return {
        "format": MANIFEST_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "comfy_nearid_version": __version__,
        "seed": config.seed,
        "image_size": config.image_size,
        "levels": list(config.levels),
        "splits": splits,
        "config": config.to_dict(),
    }


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``ROOT/manifest.json`` of a generated benchmark."""
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DatasetError(f"{path} does not exist: {root} is not a generated synthetic benchmark") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{path} is not a synthetic benchmark manifest (format {MANIFEST_FORMAT!r})")
    return manifest


def _tasks(config: SynthConfig, root: Path) -> Iterator[tuple[SynthConfig, str, str, int]]:
    for split in SPLITS:
        for index in range(config.count(split)):
            yield config, str(root), split, index


def generate_benchmark(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    image_size: int = 224,
    seed: int = 0,
    *,
    n_mtg: int | None = None,
    n_views: int = 3,
    levels: Sequence[str] = LEVELS,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Generate the synthetic benchmark into ``out_dir``; return its manifest (plus
    ``"rgb_images"``, the number of RGB images written).

    ``n_mtg`` defaults to ``n_test``. ``workers`` > 1 renders identities in that many
    processes (same bytes as one process). Extra ``options`` are :class:`SynthConfig` fields
    (``object_fill``, ``backgrounds_per_identity``, ``png_compress_level``).
    """
    config = SynthConfig(
        n_train=n_train, n_test=n_test, n_mtg=n_test if n_mtg is None else n_mtg, image_size=image_size,
        seed=seed, n_views=n_views, levels=tuple(levels), **options,
    )
    if not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers must be an integer >= 1, got {workers!r}")
    root = Path(out_dir)
    _prepare_output(root, overwrite)
    tasks = list(_tasks(config, root))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="synth identities", unit="id", disable=not progress)
    images = 0
    if workers == 1 or len(tasks) < 2:
        for task in tasks:
            images += _write_task(task)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=min(workers, os.cpu_count() or 1)) as pool:
            for count in pool.map(_write_task, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers)))):
                images += count
                bar.update()
    bar.close()
    manifest = build_manifest(config)
    manifest_path = root / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("wrote %d identities (%d RGB images) to %s", len(tasks), images, root)
    return manifest | {"rgb_images": images}
