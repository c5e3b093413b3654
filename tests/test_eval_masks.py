"""Masks in `nearid eval`: results never depend on --batch-size; pixel masking as the reference.

The data has masks on some images only (as the published data may): a view without a mask,
distractors without their own mask (they take their view's), a whole view slot unmasked.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from _eval_helpers import write_tiny_dataset
from comfy_nearid import load_model
from comfy_nearid.cli import main
from comfy_nearid.data.folder import FolderDataset
from comfy_nearid.errors import InvalidInputError
from comfy_nearid.evaluate import model_scorer, similarity_table
from test_masking import opencv_masked_image

REMOVED = ("s000/mask1.png",  # a view without a mask; its distractors keep theirs
           "s001/colour/mask2.png",  # a distractor without its own mask: takes its view's
           "s002/mask3.png", "s002/colour/mask3.png", "s002/shape/mask3.png")  # nothing masked in this slot


@pytest.fixture(scope="module")
def partly_masked(tmp_path_factory) -> Path:
    root = write_tiny_dataset(tmp_path_factory.mktemp("masks") / "ds", n_samples=3, seed=11)
    for rel in REMOVED:
        (root / rel).unlink()
    return root


@pytest.fixture(scope="module")
def model():
    return load_model(backbone="tiny-siglip", readout="mean", pretrained=False, device="cpu", seed=0)


def _table(root: Path, batch_size: int, **mask_options):
    scorer = model_scorer("mean:tiny-siglip", device="cpu", batch_size=batch_size, pretrained=False, **mask_options)
    return similarity_table(FolderDataset(root), scorer, progress=False)


def _mask_for(root: Path, sample: str, slot: str, k: int) -> Image.Image | None:
    """The mask the protocol uses for one image: its own, else (distractor) its view's, else none."""
    own = root / sample / (f"mask{k}.png" if slot == "view" else f"{slot}/mask{k}.png")
    view = root / sample / f"mask{k}.png"
    for path in (own, view):
        if path.exists():
            return Image.open(path).convert("L")
    return None


def _image_path(root: Path, sample: str, slot: str, k: int) -> Path:
    return root / sample / (f"view{k}.png" if slot == "view" else f"{slot}/distractor{k}.png")


def _expected_cross(root: Path, embed_one) -> np.ndarray:
    """cross_sims ``[rows, 3, 3]`` computed image by image, rows in the reader's order."""
    rows = []
    for sample in FolderDataset(root):
        views = [embed_one(_image_path(root, sample.id, "view", k), _mask_for(root, sample.id, "view", k))
                 for k in (1, 2, 3)]
        for source in sample.sources:
            dists = [embed_one(_image_path(root, sample.id, source, k), _mask_for(root, sample.id, source, k))
                     for k in (1, 2, 3)]
            rows.append(np.array([[v @ d for d in dists] for v in views]))
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["attention", "pixels"])
def test_batch_size_never_changes_similarities(partly_masked, mode):
    tables = {bs: _table(partly_masked, bs, use_masks=True, mask_mode=mode) for bs in (1, 3, 64)}
    for bs in (3, 64):
        for field in ("view_sims", "cross_sims", "distractor_sims"):
            np.testing.assert_allclose(getattr(tables[bs], field), getattr(tables[1], field),
                                       rtol=0, atol=1e-6, equal_nan=True, err_msg=f"{mode} batch {bs} {field}")
    # the masks do act (so the comparison above could fail if some were dropped)
    unmasked = _table(partly_masked, 64)
    assert np.nanmax(np.abs(unmasked.cross_sims - tables[1].cross_sims)) > 1e-3


def test_attention_masks_follow_the_protocol_image_by_image(partly_masked, model):
    """Own mask, else the view's mask for a distractor, else the whole image."""

    def embed_one(path: Path, mask: Image.Image | None) -> np.ndarray:
        image = Image.open(path).convert("RGB")
        e = model.embed([image], masks=None if mask is None else [mask], batch_size=1)[0].double().numpy()
        return e / np.linalg.norm(e)

    table = _table(partly_masked, 64, use_masks=True)
    np.testing.assert_allclose(table.cross_sims, _expected_cross(partly_masked, embed_one), atol=1e-5)


@pytest.mark.parametrize("keep", ["foreground", "background"])
def test_pixel_masks_equal_opencv_masked_copies(partly_masked, model, keep):
    """The pixel path embeds OpenCV's masked copy (the independent implementation), unmasked
    images whole, and a distractor without its own mask blackened with its view's mask."""

    def embed_one(path: Path, mask: Image.Image | None) -> np.ndarray:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        if mask is not None:
            rgb = opencv_masked_image(rgb, np.asarray(mask), keep)
        e = model.embed([Image.fromarray(rgb)], batch_size=1)[0].double().numpy()
        return e / np.linalg.norm(e)

    table = _table(partly_masked, 3, use_masks=True, mask_mode="pixels", mask_keep=keep)
    np.testing.assert_allclose(table.cross_sims, _expected_cross(partly_masked, embed_one), atol=1e-5)
    if keep == "background":
        # a "colour" distractor differs from its view only inside the (same) mask, so with the
        # inside blackened both are the same picture: cosine 1, whatever the model; a view
        # without a mask (s000 view 1, s002 view 3) stays whole, so it differs
        for r in np.flatnonzero(np.asarray(table.sources) == "colour"):
            for k in range(3):
                same = (table.ids[r], k) not in (("s000", 0), ("s002", 2))
                assert (abs(table.cross_sims[r, k, k] - 1.0) < 1e-6) == same, (table.ids[r], k)


def test_background_keep_needs_pixel_masks():
    with pytest.raises(InvalidInputError, match="pixel masking only"):
        model_scorer("mean:tiny-siglip", pretrained=False, use_masks=True, mask_keep="background")


def test_cli_masks_options(partly_masked, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "ssr", "--data", str(partly_masked), "--scorer", "mean:tiny-siglip", "--random-weights",
               "--device", "cpu", "--masks", "pixels", "--mask-keep", "background", "--bootstrap", "0",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    config = json.loads((out / "eval_config.json").read_text())
    assert config["masks"] == "pixels" and config["mask_keep"] == "background"
    assert config["scorers"]["mean:tiny-siglip"]["mask_mode"] == "pixels"
    assert config["scorers"]["mean:tiny-siglip"]["mask_keep"] == "background"
    # a bare --masks means attention masks (the default mode)
    rc = main(["eval", "ssr", "--data", str(partly_masked), "--scorer", "mean:tiny-siglip", "--random-weights",
               "--device", "cpu", "--masks", "--bootstrap", "0", "--no-progress", "--out", str(tmp_path / "att")])
    assert rc == 0
    config = json.loads((tmp_path / "att" / "eval_config.json").read_text())
    assert config["scorers"]["mean:tiny-siglip"]["mask_mode"] == "attention"
    capsys.readouterr()
    rc = main(["eval", "ssr", "--data", str(partly_masked), "--scorer", "mean:tiny-siglip", "--random-weights",
               "--mask-keep", "background", "--out", str(tmp_path / "bad")])
    assert rc == 2
    assert "--mask-keep background applies to --masks pixels" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
