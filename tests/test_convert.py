"""Parity with the reference implementation (transformers SiglipVisionModel) through the
converter, for both key layouts the released checkpoint comes in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_nearid import load_model
from comfy_nearid.cli import main as cli_main
from comfy_nearid.convert import write_converted
from comfy_nearid.errors import CheckpointError, WeightsNotFoundError

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")

from _release_helpers import reference_model, save_release  # noqa: E402  (needs transformers)


def _reference_model(seed: int = 0):
    return reference_model(seed)


def _save_release(model, directory, layout: str):
    return save_release(model, directory, layout).parent


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_converted_release_matches_transformers_forward(tmp_path, layout):
    # The Pillow processor (transformers 4.x's default; `SiglipImageProcessorPil` in 5.x, whose
    # default torchvision backend resizes differently by up to 10/255 per pixel).
    try:
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    ref = _reference_model()
    release = _save_release(ref, tmp_path / "release", layout)
    head_file, bb_file = write_converted(release, tmp_path / "head.safetensors", backbone="tiny-siglip",
                                         out_backbone=tmp_path / "backbone.safetensors")
    ours = load_model(head_file, backbone_weights=bb_file, device="cpu", dtype="fp32")

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(45, 37), (30, 30), (61, 90)]]
    proc = SiglipImageProcessor(size={"height": 30, "width": 30}, resample=Image.Resampling.BICUBIC,
                                image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours.preprocess_batch(images), pixels.float(), atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = F.normalize(ref(pixel_values=pixels).pooler_output, dim=-1)
    got = ours.embed(images)
    assert float((got - expected).abs().max()) < 1e-5
    # the backbone's own pooling (attn_pool filled from the release's head) agrees too
    pooled = load_model(head_file, backbone_weights=bb_file, device="cpu", dtype="fp32", readout="pooled")
    assert float((pooled.embed(images) - expected).abs().max()) < 1e-5


def test_cli_convert_writes_head_and_refuses_overwrite(tmp_path, capsys):
    release = _save_release(_reference_model(1), tmp_path / "rel", "5.x")
    out = tmp_path / "nearid.safetensors"
    assert cli_main(["convert", str(release), "--out", str(out), "--backbone", "tiny-siglip"]) == 0
    assert json.loads(capsys.readouterr().out)["head"] == str(out)
    from comfy_nearid.checkpoint import read_head_metadata

    meta = read_head_metadata(out)
    assert meta.provenance["converted_from"] == "Aleksandar/nearid-siglip2"
    assert len(meta.provenance["sha256"]) == 64
    assert cli_main(["convert", str(release), "--out", str(out), "--backbone", "tiny-siglip"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_convert_refuses_wrong_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        write_converted(tmp_path / "missing", tmp_path / "h.safetensors", backbone="tiny-siglip")
    (tmp_path / "other").mkdir()
    save_file({"text_model.x": torch.zeros(2)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor under the prefix 'backbone.'"):
        write_converted(tmp_path / "other", tmp_path / "h.safetensors", backbone="tiny-siglip")
    release = _save_release(_reference_model(), tmp_path / "rel", "5.x")
    with pytest.raises(CheckpointError, match="small-siglip"):
        write_converted(release, tmp_path / "h.safetensors", backbone="small-siglip")
