"""Core identity model: reference parity, head files, masks, input kinds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_nearid import load_model
from comfy_nearid.backbones import get_backbone_spec
from comfy_nearid.checkpoint import load_head_file, read_head_metadata, save_head
from comfy_nearid.errors import CheckpointError, HeadMismatchError, InvalidInputError, WeightsNotFoundError
from comfy_nearid.head import HeadConfig, NearIDHead

from conftest import random_rgb


def _pil_batch(rng, sizes):
    return [Image.fromarray(random_rgb(rng, h, w)) for h, w in sizes]


def test_embeddings_are_unit_vectors_of_head_width(tiny_model, rng):
    emb = tiny_model.embed(_pil_batch(rng, [(40, 50), (30, 30), (64, 17)]))
    assert emb.shape == (3, 32)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)


def test_comfy_image_pil_and_path_inputs_give_the_same_embedding(tiny_model, rng, tmp_path):
    arrays = [random_rgb(rng, 45, 37) for _ in range(3)]
    pils = [Image.fromarray(a) for a in arrays]
    paths = []
    for i, im in enumerate(pils):
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    comfy = torch.from_numpy(np.stack(arrays)).float() / 255.0  # ComfyUI IMAGE [B,H,W,C]
    bchw = comfy.permute(0, 3, 1, 2).contiguous()
    e_pil = tiny_model.embed(pils)
    assert torch.equal(tiny_model.embed(paths), e_pil)
    assert torch.equal(tiny_model.embed(comfy), e_pil)
    assert torch.equal(tiny_model.embed(bchw), e_pil)


def test_batching_does_not_change_embeddings(tiny_model, rng):
    pils = _pil_batch(rng, [(33, 33)] * 5)
    torch.testing.assert_close(tiny_model.embed(pils, batch_size=2), tiny_model.embed(pils, batch_size=5), atol=1e-6, rtol=0)


def test_mask_restricted_attention_equals_attention_over_only_the_masked_tokens():
    torch.manual_seed(0)
    cfg = HeadConfig(dim=32, num_heads=4, mlp_dim=64)
    head = NearIDHead(cfg).eval()
    tokens = torch.randn(3, 20, 32)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, [1, 5, 7]] = True
    mask[1, :] = True
    mask[2, 19] = True
    masked = head(tokens, mask=mask)
    for b in range(3):
        only = head(tokens[b : b + 1, mask[b]])
        torch.testing.assert_close(masked[b : b + 1], only, atol=1e-6, rtol=0)
    # the explicit-attention path agrees with the fused one and puts zero weight off-mask
    emb, attn = head(tokens, mask=mask, return_attention=True)
    torch.testing.assert_close(emb, masked, atol=1e-6, rtol=0)
    assert attn.shape == (3, 4, 20)
    assert float(attn.detach()[~mask[:, None, :].expand_as(attn)].abs().max()) == 0.0
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4), atol=1e-6, rtol=0)


def test_head_matches_a_hand_written_map_pooling():
    """Independent re-implementation with torch.nn.MultiheadAttention (as the reference uses)."""
    torch.manual_seed(1)
    cfg = HeadConfig(dim=16, num_heads=2, mlp_dim=24)
    head = NearIDHead(cfg).eval()
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    mha.in_proj_weight.data.copy_(head.attention.in_proj_weight)
    mha.in_proj_bias.data.copy_(head.attention.in_proj_bias)
    mha.out_proj.load_state_dict(head.attention.out_proj.state_dict())
    tokens = torch.randn(4, 9, 16)
    a = mha(head.probe.expand(4, 1, 16), tokens, tokens, need_weights=False)[0]
    ln = F.layer_norm(a, (16,), head.layernorm.weight, head.layernorm.bias, 1e-6)
    mlp = F.linear(F.gelu(F.linear(ln, head.mlp.fc1.weight, head.mlp.fc1.bias), approximate="tanh"),
                   head.mlp.fc2.weight, head.mlp.fc2.bias)
    expected = F.normalize((a + mlp)[:, 0], dim=-1)
    torch.testing.assert_close(head(tokens), expected, atol=1e-6, rtol=0)


def test_image_mask_maps_to_the_token_grid(tiny_model):
    # tiny-siglip: 30 px input, patch 4, 7x7 grid covering the top-left 28 px.
    mask = torch.zeros(1, 60, 60)
    mask[:, :30, :30] = 1.0  # top-left quarter of the image -> rows/cols 0..3 (coverage >= 0.5)
    tm = tiny_model.token_mask(mask, 1).reshape(7, 7)
    # pixel 30/60 of the image is 15/30 of the input: patches 0..2 fully, patch 3 (12..16) 3/4 covered
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(tm, expected)


def test_missing_and_empty_masks_keep_every_token_and_embed_as_without_mask(tiny_model, rng, caplog):
    # The one policy (mask_token_grid): no mask, or a mask with no subject pixel, means the
    # whole image; an empty mask is logged. A list may mix masks and None.
    mask = np.zeros((30, 30), np.float32)
    mask[:, :12] = 1.0
    with caplog.at_level("WARNING", logger="comfy_nearid.model"):
        tm = tiny_model.token_mask([None, np.zeros((8, 8), np.float32), mask], 3)
    assert "empty" in caplog.text
    assert tm[0].all() and tm[1].all()
    assert torch.equal(tm[2], tiny_model.token_mask(mask, 1)[0]) and not tm[2].all()
    images = [random_rgb(rng, 30, 30) for _ in range(3)]
    plain = tiny_model.embed(images)
    mixed = tiny_model.embed(images, masks=[None, np.zeros((8, 8), np.float32), mask])
    torch.testing.assert_close(mixed[:2], plain[:2], atol=1e-6, rtol=0)
    assert not torch.allclose(mixed[2], plain[2], atol=1e-4)


def test_masked_embedding_pools_only_the_tokens_under_the_mask(tiny_model, rng):
    # The ViT mixes tokens, so the mask acts at the pooling head: the masked embedding is the
    # head applied to the subset of tokens under the mask.
    base = random_rgb(rng, 30, 30)
    mask = np.zeros((30, 30), np.float32)
    mask[:, :12] = 1.0  # token columns 0..2 of the 7x7 grid
    images = torch.from_numpy(base[None]).float() / 255
    masked = tiny_model.embed(images, masks=torch.from_numpy(mask[None]))
    tokens = tiny_model.tokens(tiny_model.preprocess_batch(images)).reshape(1, 7, 7, 32)
    expected = tiny_model.head(tokens[:, :, :3].reshape(1, 21, 32))
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=0)
    assert float((masked - tiny_model.embed(images)).abs().max()) > 1e-4


def test_head_round_trip_is_bit_exact(tiny_model, tmp_path):
    path = save_head(tmp_path / "h.safetensors", tiny_model.head, tiny_model.spec, provenance={"steps": 3})
    state, meta = load_head_file(path)
    for k, v in tiny_model.head.state_dict().items():
        assert torch.equal(state[k], v), k
    assert meta.backbone == "tiny-siglip" and meta.embed_dim == 32 and meta.num_tokens == 49
    assert meta.provenance == {"steps": 3}
    reloaded = load_model(path, pretrained=False, device="cpu", dtype="fp32")
    for k, v in tiny_model.head.state_dict().items():
        assert torch.equal(reloaded.head.state_dict()[k], v)


def test_mismatched_head_is_refused_naming_expected_and_found(tiny_model, tmp_path):
    path = save_head(tmp_path / "h.safetensors", tiny_model.head, tiny_model.spec)
    with pytest.raises(HeadMismatchError, match="trained on backbone 'tiny-siglip'.*'small-siglip'"):
        load_model(path, backbone="small-siglip", pretrained=False)
    # metadata edited to claim another image size
    from safetensors.torch import load_file, save_file

    meta = read_head_metadata(path).to_strings()
    meta["image_size"] = "64"
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(HeadMismatchError, match="image_size: head has 64, backbone needs 30"):
        load_model(tmp_path / "bad.safetensors", pretrained=False)
    # tensor of the wrong shape
    state = load_file(str(path))
    state["mlp.fc1.weight"] = torch.zeros(65, 32)
    save_file(state, str(tmp_path / "shape.safetensors"), metadata=read_head_metadata(path).to_strings())
    with pytest.raises(HeadMismatchError, match=r"mlp.fc1.weight has shape \(65, 32\), expected \(64, 32\)"):
        load_model(tmp_path / "shape.safetensors", pretrained=False)
    # not a head file at all
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no metadata"):
        load_model(tmp_path / "other.safetensors", pretrained=False)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_model(tmp_path / "garbage.safetensors", pretrained=False)


def test_missing_weights_fail_at_once_saying_where_and_how(monkeypatch, tmp_path):
    monkeypatch.setenv("NEARID_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as e:
        load_model(backbone="siglip2-so400m")
    msg = str(e.value)
    assert "siglip2-so400m" in msg and str(tmp_path / "siglip2-so400m") in msg
    assert "--backbone-weights" in msg and "NEARID_ALLOW_DOWNLOAD" in msg
    with pytest.raises(WeightsNotFoundError, match="nope.pth does not exist"):
        load_model(backbone="mobilenet-v2", backbone_weights=tmp_path / "nope.pth")


def test_mobilenet_weights_are_found_offline_and_hash_checked(tmp_path):
    from comfy_nearid.errors import CheckpointError as CE
    from comfy_nearid.weights import resolve_backbone_weights

    spec = get_backbone_spec("mobilenet-v2")
    path = resolve_backbone_weights(spec)
    assert path.name == "mobilenet_v2-b0353104.pth"
    bad = tmp_path / "mobilenet-v2" / "mobilenet_v2-b0353104.pth"
    bad.parent.mkdir()
    bad.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    import os

    os.environ["NEARID_WEIGHTS_DIR"] = str(tmp_path)
    try:
        with pytest.raises(CE, match="sha256"):
            resolve_backbone_weights(spec)
    finally:
        del os.environ["NEARID_WEIGHTS_DIR"]


def test_bad_tensors_are_refused(tiny_model):
    with pytest.raises(InvalidInputError, match="NaN"):
        tiny_model.embed(torch.full((1, 8, 8, 3), float("nan")))
    with pytest.raises(InvalidInputError, match=r"0\.\.1"):
        tiny_model.embed(torch.full((1, 8, 8, 3), 2.0))
    with pytest.raises(InvalidInputError, match="empty"):
        tiny_model.embed(torch.zeros(0, 8, 8, 3))
    with pytest.raises(InvalidInputError, match="channel"):
        tiny_model.embed(torch.zeros(1, 8, 8, 7))
    with pytest.raises(InvalidInputError, match="2 masks for 3 images"):
        tiny_model.embed(torch.zeros(3, 8, 8, 3), masks=torch.ones(2, 8, 8))


def test_low_precision_cpu_path_stays_close_to_fp32(rng):
    fp32 = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32")
    bf16 = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="bf16")
    pils = _pil_batch(rng, [(30, 30)] * 4)
    cos = (fp32.embed(pils) * bf16.embed(pils)).sum(-1)
    assert float(cos.min()) > 0.99
    # the cache identity tells them apart
    assert bf16.identity == fp32.identity + "|dtype=bfloat16"


def test_readouts_and_identity(rng):
    pils = _pil_batch(rng, [(30, 30)] * 2)
    ident = set()
    for readout in ("head", "pooled", "mean"):
        m = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", readout=readout)
        e = m.embed(pils)
        torch.testing.assert_close(e.norm(dim=1), torch.ones(2), atol=1e-6, rtol=0)
        ident.add(m.identity)
    assert len(ident) == 3
    # mean readout is the normalised mean of the tokens, computed here by hand
    m = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", readout="mean")
    tokens = m.tokens(m.preprocess_batch(pils))
    torch.testing.assert_close(m.embed(pils), F.normalize(tokens.mean(1), dim=-1), atol=1e-6, rtol=0)


def test_attention_map_is_a_distribution_over_the_grid(tiny_model, rng):
    a = tiny_model.attention_map(Image.fromarray(random_rgb(rng, 50, 40)))
    assert a.shape == (7, 7)
    assert math.isclose(float(a.sum()), 1.0, abs_tol=1e-5)
    assert float(a.min()) >= 0


def test_siglip_backbone_uses_tanh_gelu_and_729_tokens_for_so400m():
    from comfy_nearid.backbones import build_trunk

    spec = get_backbone_spec("siglip2-so400m")
    assert spec.grid_size == (27, 27) and spec.num_tokens == 729 and spec.image_size == 384
    # build only the config (meta device: no memory) to check the architecture
    with torch.device("meta"):
        trunk = build_trunk(spec)
    assert trunk.pos_embed.shape == (1, 729, 1152)
    assert len(trunk.blocks) == 27
    assert trunk.blocks[0].mlp.fc1.out_features == 4304
    acts = {type(m).__name__ for m in trunk.modules() if "GELU" in type(m).__name__}
    assert acts == {"GELUTanh"}


def test_siglip_tokens_alone_equal_the_tokens_of_the_joint_pass():
    from comfy_nearid.model import load_model

    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", seed=0)
    side = model.spec.image_size
    pixels = torch.randn(2, 3, side, side)
    assert torch.equal(model.backbone(pixels), model.backbone.tokens_and_pooled(pixels)[0])
