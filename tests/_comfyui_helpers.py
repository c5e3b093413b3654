"""Helpers shared by the node-pack tests: importing the pack as ComfyUI does, test images,
and the expected values computed independently of the nodes (numpy formulas)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE = "comfy_nearid_pack_under_test"


def import_pack() -> ModuleType:
    """Import the repository root as a package, the way ComfyUI's custom-node loader does
    (a spec from ``__init__.py`` with the folder as its search location), never as ``nodes``."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def structured_images(seed: int, count: int, height: int = 40, width: int = 48) -> np.ndarray:
    """``count`` distinct uint8 RGB images ``[count, H, W, 3]``: a coloured rectangle on a
    textured background, so that images differ in content and the scores spread out."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        img = rng.integers(0, 80, size=(height, width, 3)).astype(np.uint8)
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        y1, x1 = y0 + rng.integers(8, height // 2), x0 + rng.integers(8, width // 2)
        img[y0:y1, x0:x1] = rng.integers(80, 256, size=3).astype(np.uint8)
        out[i] = img
    return out


def to_comfy(images: np.ndarray):
    """uint8 ``[B,H,W,3]`` -> ComfyUI IMAGE float ``[B,H,W,3]`` in 0..1 (as LoadImage makes it)."""
    import torch

    return torch.from_numpy(images.astype(np.float32) / 255.0)


def expected_scores(ref: np.ndarray, cand: np.ndarray, mode: str) -> np.ndarray:
    """The identity score formulas, written out: ``ref`` [R, D], ``cand`` [N, D] unit vectors."""
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    if mode == "prototype":
        proto = ref.mean(axis=0)
        proto /= np.linalg.norm(proto)
        return cand @ proto
    sims = np.array([[float(np.dot(c, r)) for r in ref] for c in cand])
    return sims.mean(axis=1) if mode == "mean" else sims.max(axis=1)


def default_match(cosine: float) -> float:
    """The documented default calibration: 100 / (1 + exp(-10 (c - 0.5)))."""
    return 100.0 / (1.0 + math.exp(-10.0 * (cosine - 0.5)))
