"""A tiny on-disk NearID-format dataset with exact background sharing, for the evaluator tests.

Each identity is a coloured disc or square. A view puts it at its own position and size on
its own random background; each distractor source redraws the view with one attribute of the
object changed ("colour": hue shifted, "shape": disc <-> square) on a bit-identical copy of
that view's background, with its own mask. Written in the folder layout that
:class:`comfy_nearid.data.folder.FolderDataset` reads; ~48 px images keep it fast.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64


def _background(rng: np.random.Generator) -> np.ndarray:
    """Smooth two-colour gradient plus noise and a clutter rectangle: ``[S, S, 3]`` uint8."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, SIZE)[None, :, None]
    img = a[None, None, :] * (1 - t) + b[None, None, :] * t + rng.normal(0, 12, (SIZE, SIZE, 3))
    x0, y0 = rng.integers(0, SIZE - 12, 2)
    img[y0 : y0 + 10, x0 : x0 + 12] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    if shape == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)


def _colour(hue: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.8, 0.9)) * 255


def _draw(background: np.ndarray, shape: str, hue: float, cx: float, cy: float, r: float) -> tuple[Image.Image, Image.Image]:
    mask = _shape_mask(shape, cx, cy, r)
    img = background.copy()
    img[mask] = _colour(hue).astype(np.uint8)
    return Image.fromarray(img), Image.fromarray((mask * 255).astype(np.uint8))


def write_tiny_dataset(root: Path, n_samples: int = 8, seed: int = 0, n_views: int = 3) -> Path:
    """Write ``n_samples`` identities (``n_views`` views, sources "colour" and "shape")."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_samples):
        shape = ("disc", "square")[s % 2]
        hue = rng.uniform(0, 1)
        d = root / f"s{s:03d}"
        d.mkdir()
        (d / "sample.json").write_text(json.dumps({"category": shape}))
        for src in ("colour", "shape"):
            (d / src).mkdir()
        for k in range(1, n_views + 1):
            bg = _background(rng)
            cx, cy = rng.uniform(20, SIZE - 20, 2)
            r = rng.uniform(14, 20)
            view, mask = _draw(bg, shape, hue, cx, cy, r)
            view.save(d / f"view{k}.png")
            mask.save(d / f"mask{k}.png")
            other_shape = "square" if shape == "disc" else "disc"
            for src, (sh, h) in {"colour": (shape, hue + rng.uniform(0.25, 0.5)), "shape": (other_shape, hue)}.items():
                dist, dmask = _draw(bg, sh, h, cx, cy, r)
                dist.save(d / src / f"distractor{k}.png")
                dmask.save(d / src / f"mask{k}.png")
    return root


def write_tiny_mtg(root: Path, n_samples: int = 10, seed: int = 0) -> Path:
    """MTG folder layout: two views, an edited copy of each (a recoloured wedge = the part)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    for s in range(n_samples):
        d = root / f"m{s:03d}"
        d.mkdir()
        hue = rng.uniform(0, 1)
        for k in (1, 2):
            bg = _background(rng)
            cx, cy = rng.uniform(16, SIZE - 16, 2)
            r = rng.uniform(10, 13)
            view, obj = _draw(bg, "disc", hue, cx, cy, r)
            obj_mask = np.asarray(obj) > 0
            # the edited part: the object pixels within a random angular wedge
            width = rng.uniform(0.3, 2.5)
            angle = np.arctan2(yy - cy, xx - cx) % (2 * np.pi)
            part = obj_mask & (angle < width)
            edited = np.asarray(view).copy()
            edited[part] = _colour(hue + 0.5).astype(np.uint8)
            view.save(d / f"view{k}.png")
            Image.fromarray(edited).save(d / f"edited{k}.png")
            obj.save(d / f"object_mask{k}.png")
            Image.fromarray((part * 255).astype(np.uint8)).save(d / f"part_mask{k}.png")
    return root
