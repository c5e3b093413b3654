"""The paper's release as downloaded: recognised by its tensor layout under any name, converted
by the one conversion path, kept in the conversion cache, and refused in plain words when it is
something else. The loader node's functions are called directly here (no ComfyUI); the real
server runs them in tests/test_comfyui_release.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_nearid import load_model
from comfy_nearid.checkpoint import read_head_metadata, save_head
from comfy_nearid.cli import main as cli_main
from comfy_nearid.convert import cached_conversion, inspect_release
from comfy_nearid.errors import CheckpointError, WeightsNotFoundError

pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")

from _comfyui_helpers import import_pack  # noqa: E402
from _release_helpers import reference_embeddings, reference_model, save_release  # noqa: E402


@pytest.fixture(scope="module")
def ref():
    return reference_model(seed=5)


@pytest.fixture(scope="module")
def loader():
    pack = import_pack()
    return sys.modules[pack.__name__ + ".nodes.loader"]


def _images(seed: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 33), (30, 30), (52, 71)]]


@pytest.mark.parametrize("layout,name", [("4.x", "model.safetensors"), ("5.x", "my-nearid-download.safetensors")])
def test_release_is_recognised_by_its_tensors_under_any_name(tmp_path, ref, layout, name):
    path = save_release(ref, tmp_path / name, layout)
    info = inspect_release(path)
    assert (info.layout, info.backbone) == (f"transformers {layout}", "tiny-siglip")
    head = tmp_path / "head.safetensors"
    save_head(head, load_model(backbone="tiny-siglip", pretrained=False).head, load_model(backbone="tiny-siglip", pretrained=False).spec)
    assert inspect_release(head) is None  # a head file is not a release


def test_config_json_is_used_to_check_the_release(tmp_path, ref):
    path = save_release(ref, tmp_path / "rel", "4.x", with_config=True)
    assert inspect_release(path).backbone == "tiny-siglip"  # the model's own config agrees
    cfg = json.loads((path.parent / "config.json").read_text())
    cfg["num_attention_heads"] = 4  # heads are invisible in the tensors: only the config tells
    (path.parent / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"num_attention_heads = 4 \(backbone tiny-siglip has 2\)"):
        inspect_release(path)


def test_release_of_an_unregistered_shape_names_its_shape(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    odd = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=30, patch_size=4))
    path = save_release(odd, tmp_path / "odd.safetensors", "5.x")
    with pytest.raises(CheckpointError, match=r"\(24, 4, 49, 1, 48\), which no registered backbone has"):
        inspect_release(path)


def test_conversion_cache_converts_once_per_content(tmp_path, ref):
    release = save_release(ref, tmp_path / "a" / "model.safetensors", "5.x")
    cache = tmp_path / "cache"
    first = cached_conversion(release, cache)
    stamps = {p: p.stat().st_mtime_ns for p in (first.head, first.backbone)}
    second = cached_conversion(release, cache)
    assert (first.reused, second.reused) == (False, True)
    assert (second.head, second.backbone) == (first.head, first.backbone)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # read back, not rewritten
    # the same bytes under another name and folder: the same entry (content key)
    copy = tmp_path / "b" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copy(release, copy)
    assert cached_conversion(copy, cache).head == first.head
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == first.sha256  # the entry is named by content
    # the cache holds exactly what `nearid convert` writes (one conversion path)
    out = tmp_path / "cli"
    assert cli_main(["convert", str(release), "--out", str(out / "h.safetensors"),
                     "--backbone-out", str(out / "b.safetensors")]) == 0
    from safetensors.torch import load_file

    for cached_file, cli_file in ((first.head, out / "h.safetensors"), (first.backbone, out / "b.safetensors")):
        a, b = load_file(str(cached_file)), load_file(str(cli_file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another release is another entry
    other = save_release(reference_model(seed=6), tmp_path / "c" / "model.safetensors", "5.x")
    assert cached_conversion(other, cache).head != first.head


def test_loader_loads_a_release_and_second_load_reads_the_cached_conversion(tmp_path, ref, loader, monkeypatch):
    monkeypatch.delenv("NEARID_RELEASE_CACHE", raising=False)
    release = save_release(ref, tmp_path / "models" / "nearid-siglip2" / "model.safetensors", "4.x", with_config=True)
    loader.clear_cache()
    model, first = loader.load_cached(str(release), device="cpu", dtype="fp32")
    assert (first.kind, first.conversion, first.backbone) == ("release", "converted", "tiny-siglip")
    images = _images()
    assert float((model.embed(images) - reference_embeddings(ref, images)).abs().max()) < 1e-5
    loader.clear_cache()  # forget the loaded model: the next load reads the conversion cache
    again, second = loader.load_cached(str(release), device="cpu", dtype="fp32")
    assert (second.cached, second.conversion) == (False, "reused")
    assert torch.equal(again.embed(images), model.embed(images))
    # outside ComfyUI the cache sits next to the release; NEARID_RELEASE_CACHE moves it
    entry = hashlib.sha256(release.read_bytes()).hexdigest()[:32]  # entries are named by content
    assert (release.parent / ".nearid-cache" / entry / "head.safetensors").is_file()
    monkeypatch.setenv("NEARID_RELEASE_CACHE", str(tmp_path / "elsewhere"))
    loader.clear_cache()
    assert loader.load_cached(str(release), device="cpu", dtype="fp32")[1].conversion == "converted"
    assert (tmp_path / "elsewhere" / entry / "head.safetensors").is_file()


def test_loader_tooltip_lists_each_file_with_its_backbone(tmp_path, ref, loader, monkeypatch):
    release = save_release(ref, tmp_path / "rel.safetensors", "5.x")
    head = tmp_path / "head.safetensors"
    tiny = load_model(backbone="tiny-siglip", pretrained=False)
    save_head(head, tiny.head, tiny.spec)
    tip = loader.model_list_tooltip([str(release), str(head), str(tmp_path / "absent.safetensors")])
    assert f"{release}: release (transformers 5.x) on tiny-siglip, backbone included" in tip
    assert f"{head}: head file on tiny-siglip" in tip
    assert "absent.safetensors: the paper's release, not downloaded yet (turn on 'download')" in tip


def test_a_pickle_chosen_as_head_says_so(tmp_path, loader):
    fake = tmp_path / "nearid-head.safetensors"
    torch.save({"probe": torch.zeros(1, 1, 32)}, fake)  # a .pt renamed to .safetensors
    for read in (read_head_metadata, lambda p: load_model(head=p), loader.describe_model_file):
        with pytest.raises(CheckpointError, match=r"not a safetensors file \(a renamed \.pt/\.ckpt\?\): it is a zip"):
            read(str(fake))
    fake.write_bytes(b"\x80\x04K\x01." + bytes(64))  # a bare pickle
    with pytest.raises(CheckpointError, match="it is a pickle"):
        read_head_metadata(fake)


def test_the_release_entry_is_never_downloaded_without_the_toggle(tmp_path, loader, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError, match="Turn on 'download' in Load NearID Model"):
        loader.resolve_head_path(loader.RELEASE_ENTRY, download=False)
    assert list(tmp_path.iterdir()) == []


def test_the_toggle_in_offline_mode_says_so(tmp_path, loader):
    # conftest turns Hugging Face's offline mode on for every test process
    with pytest.raises(WeightsNotFoundError, match=r"offline mode is on \(HF_HUB_OFFLINE=1"):
        loader.resolve_head_path(loader.RELEASE_ENTRY, download=True)
