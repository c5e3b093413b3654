"""Helpers for the scoring, embedding-cache and best-of-N tests: real image files on disk,
broken files of every kind, an independent scorer, and a subprocess runner for the CLI."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (36, 44), fmt: str | None = None) -> Path:
    """A random RGB picture saved at ``path`` (format from the suffix unless ``fmt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_smooth_image(path: Path, rng: np.random.Generator, side: int, quality: int = 90) -> Path:
    """A smooth (upsampled 8x8 noise) JPEG: cheap to write, realistic to decode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR).save(path, quality=quality)
    return path


def write_broken_files(folder: Path, rng: np.random.Generator) -> dict[str, str]:
    """One file of each broken kind; returns ``{file name: words its error reason contains}``."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    (folder / "b_truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "b_text.png").write_bytes(b"this is a caption, not a picture\n")
    # Valid signature and header, scrambled pixel data of the same length.
    scrambled = bytes(rng.integers(0, 256, len(png) - 80, dtype=np.uint8))
    (folder / "b_corrupt.png").write_bytes(png[:60] + scrambled + png[-20:])
    return {
        "b_truncated.png": "truncated",
        "b_empty.jpg": "empty",
        "b_text.png": "not a recognised image format",
        "b_corrupt.png": "corrupt",
    }


def cosines_direct(model, references: Sequence[Path], images: Sequence[Path]) -> np.ndarray:
    """``[N, R]`` cosines from ``model.embed`` called on each file on its own (no batching)."""
    refs = np.stack([model.embed([p])[0].numpy() for p in references]).astype(np.float64)
    gens = np.stack([model.embed([p])[0].numpy() for p in images]).astype(np.float64)
    return gens @ refs.T


def default_identity_match(cosine: float) -> float:
    """The documented default calibration: 100 / (1 + exp(-10 (c - 0.5)))."""
    return 100.0 / (1.0 + math.exp(-10.0 * (cosine - 0.5)))


def ranks_by_hand(scores: Sequence[float]) -> list[int]:
    """1 = highest; ties keep input order (a plain stable sort)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    for r, i in enumerate(order, start=1):
        ranks[i] = r
    return ranks


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: one torch thread (so runs are bit-reproducible),
    offline, this checkout importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def nearid_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "comfy_nearid", *args]


def run_nearid(args: Sequence[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(nearid_command(*args), cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


TINY_MODEL_ARGS = ("--backbone", "tiny-siglip", "--random-weights", "--seed", "0", "--device", "cpu",
                   "--dtype", "fp32", "--threads", "1", "--no-progress")
