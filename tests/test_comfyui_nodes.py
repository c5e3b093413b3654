"""The nodes called directly (no ComfyUI process): thinness over comfy_nearid, ordering,
thresholds, carried latents/masks, heat-map geometry and clear errors on bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from _comfyui_helpers import default_match, expected_scores, import_pack, structured_images, to_comfy
from comfy_nearid import load_model
from comfy_nearid.errors import CheckpointError, InvalidInputError

pack = import_pack()
scoring = pack.nodes.scoring
heatmap = pack.nodes.heatmap
loader = pack.nodes.loader


@pytest.fixture(scope="module")
def images():
    ref = structured_images(1, 2)
    cand = structured_images(2, 5)
    return ref, cand


def _embed(model, arr: np.ndarray) -> np.ndarray:
    return model.embed(list(arr), batch_size=64).numpy()


@pytest.mark.parametrize("mode", ["mean", "max", "prototype"])
def test_identity_score_equals_the_library_and_the_formulas(tiny_model, images, mode):
    ref, cand = images
    out = scoring.NearIDIdentityScore().score(tiny_model, to_comfy(cand), combine=mode, reference=to_comfy(ref), batch_size=2)
    scores, matches, preview, best, best_match, best_index = out["result"]
    want = expected_scores(_embed(tiny_model, ref), _embed(tiny_model, cand), mode)
    np.testing.assert_allclose(scores, want, atol=1e-5)
    np.testing.assert_allclose(matches, [default_match(c) for c in want], atol=1e-3)
    assert best_index == int(np.argmax(want))
    assert best == pytest.approx(want.max(), abs=1e-5)
    assert best_match == pytest.approx(default_match(want.max()), abs=1e-3)
    assert f"#{best_index}:" in preview and "best" in preview
    assert out["ui"]["nearid_scores"] == scores


def test_reference_embedding_from_embed_node_gives_the_same_scores(tiny_model, images):
    ref, cand = images
    emb, count = scoring.NearIDEmbed().embed(tiny_model, to_comfy(ref), batch_size=1)
    assert count == 2
    via_embedding = scoring.NearIDIdentityScore().score(tiny_model, to_comfy(cand), reference_embedding=emb)["result"][0]
    via_images = scoring.NearIDIdentityScore().score(tiny_model, to_comfy(cand), reference=to_comfy(ref))["result"][0]
    np.testing.assert_allclose(via_embedding, via_images, atol=1e-6)


def test_embedding_of_another_model_is_refused(tiny_model, images):
    other = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=1)
    emb, _ = scoring.NearIDEmbed().embed(other, to_comfy(images[0]))
    with pytest.raises(InvalidInputError, match="different NearID model"):
        scoring.NearIDIdentityScore().score(tiny_model, to_comfy(images[1]), reference_embedding=emb)


def test_rerank_sorts_by_score_keeps_top_k_and_carries_latent_and_mask(tiny_model, images):
    ref, cand = images
    n = len(cand)
    latent = {"samples": torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 4, 2, 2).clone(),
              "batch_index": [10 + i for i in range(n)]}
    masks = torch.zeros(n, cand.shape[1], cand.shape[2])
    for i in range(n):
        masks[i, : 4 + 4 * i, :] = 1.0  # a different (non-empty) mask per candidate
    images_out, latent_out, mask_out, scores, indices, _ = scoring.NearIDRerank().rerank(
        tiny_model, to_comfy(cand), top_k=3, reference=to_comfy(ref), candidate_mask=masks, latent=latent
    )["result"]
    masked = tiny_model.embed(to_comfy(cand), masks=masks).numpy()
    want = expected_scores(_embed(tiny_model, ref), masked, "mean")
    order = sorted(range(n), key=lambda i: -want[i])[:3]
    assert indices == order
    np.testing.assert_allclose(scores, want[order], atol=1e-5)
    assert torch.equal(images_out, to_comfy(cand)[order])
    assert latent_out["samples"][:, 0, 0, 0].tolist() == [float(i) for i in order]
    assert latent_out["batch_index"] == [10 + i for i in order]
    assert torch.equal(mask_out, masks[order])


def test_rerank_is_stable_for_equal_scores_and_top_k_zero_keeps_all(tiny_model, images):
    ref, cand = images
    twice = np.concatenate([cand[:2], cand[:2]])  # candidates 0/2 and 1/3 score the same
    out = scoring.NearIDRerank().rerank(tiny_model, to_comfy(twice), top_k=0, reference=to_comfy(ref))["result"]
    indices = out[4]
    assert sorted(indices) == [0, 1, 2, 3]
    first, second = (0, 1) if out[3][0] >= out[3][-1] else (1, 0)
    assert indices.index(first) < indices.index(first + 2)
    assert indices.index(second) < indices.index(second + 2)
    assert out[1] is None  # no latent connected
    assert torch.equal(out[2], torch.ones(4, twice.shape[1], twice.shape[2]))


def test_rerank_rejects_a_latent_batch_of_another_size(tiny_model, images):
    ref, cand = images
    with pytest.raises(InvalidInputError, match="latent: its batch has 2 latents but there are 5 candidates"):
        scoring.NearIDRerank().rerank(tiny_model, to_comfy(cand), reference=to_comfy(ref),
                                      latent={"samples": torch.zeros(2, 4, 2, 2)})


@pytest.mark.parametrize("scale", ["identity match (0-100)", "cosine"])
def test_filter_split_matches_the_threshold(tiny_model, images, scale):
    ref, cand = images
    want = expected_scores(_embed(tiny_model, ref), _embed(tiny_model, cand), "mean")
    values = [default_match(c) for c in want] if scale.startswith("identity") else list(want)
    ordered = sorted(values)
    # midway between two neighbours, so float32/float64 rounding cannot move a candidate across
    low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    tolerance = 1e-3 if scale.startswith("identity") else 1e-5  # float32 node vs float64 formula
    assert high - low > 2 * tolerance, f"the test images give nearly equal {scale} values {ordered}"
    threshold = float((low + high) / 2)
    passed, rejected, p_idx, r_idx, scores, count, _ = scoring.NearIDFilter().filter(
        tiny_model, to_comfy(cand), threshold=threshold, threshold_on=scale, reference=to_comfy(ref)
    )["result"]
    assert p_idx == [i for i, v in enumerate(values) if v >= threshold]
    assert r_idx == [i for i, v in enumerate(values) if v < threshold]
    assert count == len(p_idx) and 0 < count < len(cand)
    assert torch.equal(passed, to_comfy(cand)[p_idx])
    assert torch.equal(rejected, to_comfy(cand)[r_idx])
    np.testing.assert_allclose(scores, want, atol=1e-5)


def test_filter_when_nothing_passes_gives_an_empty_batch_or_the_best(tiny_model, images):
    ref, cand = images
    node = scoring.NearIDFilter()
    empty = node.filter(tiny_model, to_comfy(cand), threshold=100.0, when_none_pass="pass nothing",
                        empty_outputs="empty batch", reference=to_comfy(ref))["result"]
    assert empty[0].shape == (0, cand.shape[1], cand.shape[2], 3)
    assert empty[2] == [] and empty[3] == list(range(len(cand))) and empty[5] == 0
    assert "passed is an empty 0-image batch" in empty[6] and "cannot take an empty batch" in empty[6]
    assert "cannot take an empty batch" in scoring.NearIDFilter.INPUT_TYPES()["required"]["empty_outputs"][1]["tooltip"]
    best = node.filter(tiny_model, to_comfy(cand), threshold=100.0, when_none_pass="keep best", reference=to_comfy(ref))
    want = expected_scores(_embed(tiny_model, ref), _embed(tiny_model, cand), "mean")
    assert best["result"][2] == [int(np.argmax(want))]
    assert best["result"][0].shape[0] == 1
    assert best["ui"]["nearid_fallback"] == [True]
    assert "empty batch" not in best["result"][6]  # skipping downstream nodes needs no warning


def test_previews_say_whether_the_match_is_calibrated(tmp_path, tiny_model, images):
    from comfy_nearid.calibration import Calibration, write_head_calibration

    ref, cand = images
    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head)
    for calibration, word in ((None, "uncalibrated"), (Calibration(0.1, 8.0, "test", 4, 4), "calibrated (")):
        write_head_calibration(head, calibration)
        model = load_model(head=head, pretrained=False, device="cpu", dtype="fp32")
        out = scoring.NearIDIdentityScore().score(model, to_comfy(cand), reference=to_comfy(ref))
        assert f"match: {word}" in out["result"][2]
        assert out["ui"]["nearid_calibrated"] == [calibration is not None]
        filtered = scoring.NearIDFilter().filter(model, to_comfy(cand), reference=to_comfy(ref))["result"][6]
        assert f"match: {word}" in filtered


def test_bad_inputs_raise_errors_that_name_the_input(tiny_model, images):
    ref, cand = images
    node = scoring.NearIDIdentityScore()
    with pytest.raises(InvalidInputError, match="candidate.* mask size 10x10 .* does not match the candidates size 48x40"):
        node.score(tiny_model, to_comfy(cand), reference=to_comfy(ref), candidate_mask=torch.ones(1, 10, 10))
    with pytest.raises(InvalidInputError, match="candidates: the image batch is empty"):
        node.score(tiny_model, to_comfy(cand)[:0], reference=to_comfy(ref))
    with pytest.raises(InvalidInputError, match="nearid_model: expected a NEARID_MODEL"):
        node.score("not a model", to_comfy(cand), reference=to_comfy(ref))
    with pytest.raises(InvalidInputError, match="connect a reference IMAGE or a reference_embedding"):
        node.score(tiny_model, to_comfy(cand))
    with pytest.raises(InvalidInputError, match="3 masks for 5 candidates"):
        node.score(tiny_model, to_comfy(cand), reference=to_comfy(ref), candidate_mask=torch.ones(3, 40, 48))


def _counted_model(seed: int = 0):
    """A real tiny model whose forward passes are counted (images per ``embed_pixels`` call)."""
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=seed)
    counts: list[int] = []
    original = model.embed_pixels

    def counting(pixels, *args, **kwargs):
        counts.append(int(pixels.shape[0]))
        return original(pixels, *args, **kwargs)

    model.embed_pixels = counting  # instance attribute: only this model is counted
    return model, counts


@pytest.mark.parametrize("mode", ["mean", "prototype"])
def test_use_cache_second_call_runs_no_forward_and_gives_the_same_scores(tmp_path, monkeypatch, images, mode):
    from comfy_nearid.embedding_cache import EmbeddingCache, pixels_content_hash

    cache_file = tmp_path / "nodes-cache.sqlite"
    monkeypatch.setenv("NEARID_EMBEDDING_CACHE", str(cache_file))
    ref, cand = images
    model, counts = _counted_model()
    node = scoring.NearIDIdentityScore()
    first = node.score(model, to_comfy(cand), combine=mode, reference=to_comfy(ref), batch_size=2, use_cache=True)
    assert sum(counts) == len(ref) + len(cand)
    counts.clear()
    second = node.score(model, to_comfy(cand), combine=mode, reference=to_comfy(ref), batch_size=2, use_cache=True)
    assert counts == []  # everything came from the cache file
    assert second["result"][0] == first["result"][0] and second["result"][1] == first["result"][1]
    want = expected_scores(_embed(model, ref), _embed(model, cand), mode)
    np.testing.assert_allclose(first["result"][0], want, atol=1e-5)
    # the key of an in-memory image is its pixel content, under this model's identity
    with EmbeddingCache(cache_file, readonly=True) as cache:
        stored = cache.get(model.identity, pixels_content_hash(cand[3]))
        assert cache.count() == len(ref) + len(cand)
    np.testing.assert_allclose(stored, _embed(model, cand[3:4])[0], atol=1e-6)


def test_use_cache_is_shared_by_embed_rerank_and_filter_and_keyed_by_mask(tmp_path, monkeypatch, images):
    monkeypatch.setenv("NEARID_EMBEDDING_CACHE", str(tmp_path / "shared.sqlite"))
    ref, cand = images
    model, counts = _counted_model()
    emb, _ = scoring.NearIDEmbed().embed(model, to_comfy(ref), use_cache=True)
    assert sum(counts) == len(ref)
    counts.clear()
    reranked = scoring.NearIDRerank().rerank(model, to_comfy(cand), top_k=0, reference=to_comfy(ref), use_cache=True)
    assert sum(counts) == len(cand)  # only the candidates are new; the references were cached by Embed
    counts.clear()
    filtered = scoring.NearIDFilter().filter(model, to_comfy(cand), threshold=-1.0, threshold_on="cosine",
                                             reference_embedding=emb, use_cache=True)
    assert counts == []
    np.testing.assert_allclose(sorted(filtered["result"][4], reverse=True), reranked["result"][3], atol=1e-6)
    # a mask changes the embedding, so masked images are new entries (and then cached too)
    mask = torch.zeros(len(cand), cand.shape[1], cand.shape[2])
    mask[:, :20, :] = 1.0
    masked = scoring.NearIDEmbed().embed(model, to_comfy(cand), mask=mask, use_cache=True)[0]
    assert sum(counts) == len(cand)
    counts.clear()
    again = scoring.NearIDEmbed().embed(model, to_comfy(cand), mask=mask, use_cache=True)[0]
    assert counts == []
    torch.testing.assert_close(again.vectors, masked.vectors, atol=0, rtol=0)
    torch.testing.assert_close(masked.vectors, model.embed(to_comfy(cand), masks=mask), atol=1e-5, rtol=0)
    # another model (other seed) finds nothing of the first one's
    other, other_counts = _counted_model(seed=1)
    scoring.NearIDEmbed().embed(other, to_comfy(ref), use_cache=True)
    assert sum(other_counts) == len(ref)


def test_use_cache_off_by_default_writes_no_file(tmp_path, monkeypatch, images):
    monkeypatch.setenv("NEARID_EMBEDDING_CACHE", str(tmp_path / "never.sqlite"))
    ref, cand = images
    model, counts = _counted_model()
    scoring.NearIDIdentityScore().score(model, to_comfy(cand), reference=to_comfy(ref))
    scoring.NearIDIdentityScore().score(model, to_comfy(cand), reference=to_comfy(ref))
    assert sum(counts) == 2 * (len(ref) + len(cand))
    assert not (tmp_path / "never.sqlite").exists()
    tooltip = scoring.NearIDEmbed.INPUT_TYPES()["optional"]["use_cache"][1]["tooltip"]
    assert str(tmp_path / "never.sqlite") in tooltip


def test_attention_to_image_places_each_token_over_its_patch():
    # 2x2 tokens of 2 px in a 5 px model input: the 5th row/column is not seen by the model.
    attention = torch.tensor([[0.0, 0.5], [0.0, 0.0]])
    heat = heatmap.attention_to_image(attention, image_size=5, patch_size=2, height=5, width=5)
    assert heat.shape == (5, 5)
    assert float(heat.max()) == pytest.approx(1.0)
    assert float(heat[0, 3]) == pytest.approx(1.0)  # inside the top-right token, away from its edges
    assert float(heat[3, 0]) == pytest.approx(0.0)  # bottom-left token
    assert torch.all(heat[4, :] == 0) and torch.all(heat[:, 4] == 0)  # outside the token grid


def test_colormap_hits_its_stops_and_overlay_is_an_alpha_blend():
    values = torch.tensor([[0.0, 0.25, 1.0]])
    rgb = heatmap.apply_colormap(values, "jet")
    torch.testing.assert_close(rgb[0, 0], torch.tensor([0.0, 0.0, 0.5]))
    torch.testing.assert_close(rgb[0, 1], torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(rgb[0, 2], torch.tensor([0.5, 0.0, 0.0]))
    image = torch.full((1, 3, 3), 0.2)
    out = heatmap.overlay(image, values, opacity=0.25, colormap="gray")
    expected = 0.75 * 0.2 + 0.25 * values[0]  # gray colour = the value itself
    torch.testing.assert_close(out[0, :, 0], expected)


def test_heatmap_node_uses_the_model_attention(tiny_model, images):
    _, cand = images
    overlay, attention, preview = heatmap.NearIDHeatmap().heatmap(tiny_model, to_comfy(cand[:2]), opacity=1.0, colormap="gray")
    assert overlay.shape == (2, 40, 48, 3) and attention.shape == (2, 40, 48)
    spec = tiny_model.spec
    grid = tiny_model.attention_map(to_comfy(cand[1:2]))
    # The most attended token's patch centre, mapped back to image pixels, is the hottest there.
    gy, gx = divmod(int(grid.argmax()), grid.shape[1])
    cy = int((gy * spec.patch_size + spec.patch_size / 2) * 40 / spec.image_size)
    cx = int((gx * spec.patch_size + spec.patch_size / 2) * 48 / spec.image_size)
    assert float(attention[1, cy, cx]) > 0.8
    torch.testing.assert_close(overlay[1, :, :, 0], attention[1])  # gray at opacity 1 = the map
    assert preview == ""


def test_loader_caches_by_path_and_mtime(tmp_path, tiny_model):
    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head, provenance={"backbone_seed": 0})
    loader.clear_cache()
    first, r1 = loader.load_cached(str(head), device="cpu", dtype="fp32")
    second, r2 = loader.load_cached(str(head), device="cpu", dtype="auto")  # auto on CPU = fp32
    assert (r1.cached, r2.cached) == (False, True)
    assert second is first
    # The head reproduces the model it was saved from (same backbone seed, same weights).
    x = to_comfy(structured_images(5, 2))
    torch.testing.assert_close(first.embed(x), tiny_model.embed(x), atol=1e-6, rtol=0)
    st = os.stat(head)
    os.utime(head, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third, r3 = loader.load_cached(str(head), device="cpu", dtype="fp32")
    assert not r3.cached and third is not first
    loader.clear_cache()


def test_loader_reports_a_missing_or_broken_head_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors' was not found"):
        loader.NearIDModelLoader().load(str(tmp_path / "nope.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        loader.NearIDModelLoader().load(str(broken))
