"""The protocol measures what it claims: context-only scorers fail, object-only scorers succeed.

A near-identity distractor shares its view's background bit for bit. A scorer that sees only
the background must therefore rank the distractor above the other view (low SSR), and a
scorer that sees only the object must rank the other view first (SSR near 100%).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _eval_helpers import write_tiny_dataset
from comfy_nearid.data.folder import FolderDataset
from comfy_nearid.evaluate import Scorer, evaluate_dataset, feature_scorer


def test_background_only_fails_and_object_only_succeeds_on_tiny_fixture(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", n_samples=12, seed=7)
    background, obj = evaluate_dataset([feature_scorer("background"), feature_scorer("object")],
                                       FolderDataset(root), n_resamples=200, progress=False)
    for source in ("colour", "shape"):
        assert background.summary["by_source"][source]["ssr"] <= 5.0
        assert obj.summary["by_source"][source]["ssr"] >= 95.0
    assert background.summary["ci95"]["ssr"][1] < obj.summary["ci95"]["ssr"][0]


def test_batches_side_by_side_on_cores_give_the_same_table(tmp_path):
    """Scorer.cores > 1 (each thread decodes and embeds its own batches) changes how the work
    runs, not what it computes: same similarities, same summary, rows in dataset order."""
    import dataclasses

    from comfy_nearid.errors import InvalidInputError

    root = write_tiny_dataset(tmp_path / "ds", n_samples=9, seed=3)
    one = feature_scorer("object", batch_size=4)
    on_cores = dataclasses.replace(one, cores=2)
    a, b = (evaluate_dataset([s], FolderDataset(root), n_resamples=50, progress=False)[0] for s in (one, on_cores))
    assert a.summary == b.summary
    assert a.table.rows() == b.table.rows()
    with pytest.raises(InvalidInputError, match="scorer 'x': cores must be >= 1, got 0"):
        Scorer("x", one.embed_fn, cores=0)


# ------------------------------------------------------------------ synthetic benchmark


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    x = np.clip(x, 0, w - 1.001)
    y = np.clip(y, 0, h - 1.001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _canonical_object(rgb: np.ndarray, mask: np.ndarray, pose: dict, light: dict, grid: int = 40, extent: float = 2.0) -> np.ndarray:
    """The object only, in its own frame: pose undone (position, scale, rotation from the
    view's sample.json), global gain/tint and directional shading divided out, background
    weighted out by the mask. Returns ``[grid*grid*4]`` (alpha-weighted RGB, alpha)."""
    theta, scale = math.radians(pose["angle_deg"]), pose["scale"]
    u, v = np.meshgrid(np.linspace(-extent, extent, grid), np.linspace(-extent, extent, grid))
    dx = scale * (u * math.cos(theta) - v * math.sin(theta))
    dy = scale * (u * math.sin(theta) + v * math.cos(theta))
    x, y = pose["cx"] + dx - 0.5, pose["cy"] + dy - 0.5
    colour = _bilinear(rgb.astype(np.float64) / 255.0, x, y) / (light["gain"] * np.asarray(light["tint"]))
    alpha = _bilinear(mask.astype(np.float64) / 255.0, x, y)
    phi = math.radians(light["direction_deg"])
    shade = np.clip(1 + light["shade"] / (1.3 * scale) * (dx * math.cos(phi) + dy * math.sin(phi)), 0.6, 1.4)
    colour = colour / shade[..., None]
    return np.concatenate([(colour * alpha[..., None]).ravel(), alpha.ravel()])


def _pose_lookup(split_dir: Path) -> dict[str, tuple[dict, dict]]:
    """RGB content hash -> (pose, lighting) of every view and distractor (a distractor is
    drawn at its view's pose with its view's lighting)."""
    table = {}
    for sample_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        meta = json.loads((sample_dir / "sample.json").read_text())
        for k, view in enumerate(meta["views"], 1):
            files = [sample_dir / f"view{k}.png"] + [sample_dir / lv / f"distractor{k}.png" for lv in meta["distractors"]]
            for f in files:
                rgb = np.asarray(Image.open(f).convert("RGB"))
                table[hashlib.sha1(rgb.tobytes()).hexdigest()] = (view["pose"], view["lighting"])
    return table


@pytest.fixture(scope="module")
def synth_test_split(tmp_path_factory) -> Path:
    from comfy_nearid.data.synth import generate_benchmark

    root = tmp_path_factory.mktemp("synth") / "bench"
    generate_benchmark(root, n_train=0, n_test=24, image_size=128, seed=0, n_mtg=0, progress=False)
    return root / "test"


def test_protocol_on_synthetic_benchmark(synth_test_split):
    lookup = _pose_lookup(synth_test_split)

    def object_oracle(images, masks):
        out = []
        for image, mask in zip(images, masks):
            rgb = np.asarray(image.convert("RGB"))
            pose, light = lookup[hashlib.sha1(rgb.tobytes()).hexdigest()]
            out.append(_canonical_object(rgb, np.asarray(mask), pose, light))
        return np.stack(out)

    dataset = FolderDataset(synth_test_split)
    background, pixel_object, oracle = evaluate_dataset(
        [feature_scorer("background"), feature_scorer("object"), Scorer("object-oracle", object_oracle, use_masks=True)],
        dataset, n_resamples=0, progress=False,
    )
    by_bg, by_oracle = background.summary["by_source"], oracle.summary["by_source"]
    assert set(by_bg) == {"object", "part", "colour"}
    # context only: the distractor (same background) always looks closer than the other view
    for level in by_bg:
        assert by_bg[level]["ssr"] <= 5.0, level
    # object only, pose and lighting undone: whole-object and body-colour distractors are separated
    assert by_oracle["object"]["ssr"] >= 95.0
    assert by_oracle["colour"]["ssr"] >= 95.0
    # A one-part edit (the "part" level) is a few percent of the object's pixels, about the size
    # of the resampling error between two poses: even this oracle separates it only sometimes,
    # but far more often than the context-only scorer.
    assert by_oracle["part"]["ssr"] > by_bg["part"]["ssr"] + 10.0
    # the plain object histogram (no pose information) separates body-colour edits
    assert pixel_object.summary["by_source"]["colour"]["ssr"] >= 70.0
