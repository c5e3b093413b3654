"""CUDA checks: low-precision embeddings, masks, attention maps, the head and the node pack on a GPU.

Marked ``cuda``; they run whenever CUDA exists and skip (saying why) only where it does not.
Every expected value comes from the same model on the CPU in fp32 (or from the
``nn.MultiheadAttention`` form of the head), never from the GPU path under test.
``benchmarks/gpu.sh`` runs them after the GPU benchmarks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _comfyui_helpers import import_pack, structured_images, to_comfy
from comfy_nearid import load_model
from comfy_nearid.head import HeadConfig
from test_head import _mask, _pair

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (these run on a GPU machine)"),
]


@pytest.fixture(scope="module")
def cpu_model():
    """small-siglip (width 384, 6 layers, 224 px), random seeded weights, CPU fp32: the reference."""
    return load_model(backbone="small-siglip", pretrained=False, device="cpu", dtype="fp32", seed=0)


@pytest.fixture(scope="module")
def images():
    return to_comfy(structured_images(11, 6, height=96, width=80))


def _gpu_model(dtype: str):
    return load_model(backbone="small-siglip", pretrained=False, device="cuda", dtype=dtype, seed=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_embeddings_match_fp32(cpu_model, images, dtype):
    want = cpu_model.embed(images)
    got = _gpu_model(dtype).embed(images)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    cosines = (got * want).sum(-1)
    assert float(cosines.min()) >= 0.9999, f"{dtype}: min cosine to fp32 {float(cosines.min()):.6f}"


def test_auto_dtype_on_cuda_is_low_precision(images):
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cuda")
    assert model.dtype in (torch.bfloat16, torch.float16)
    assert model.head.probe.dtype == torch.float32  # the head stays fp32


def test_fp32_on_cuda_equals_cpu(cpu_model, images):
    torch.testing.assert_close(_gpu_model("fp32").embed(images), cpu_model.embed(images), atol=1e-4, rtol=0)


def test_masks_on_cuda(cpu_model, images):
    masks = torch.zeros(images.shape[0], 96, 80)
    masks[:, 10:70, 5:60] = 1.0
    masks[1, :, :] = 1.0
    gpu = _gpu_model("fp32")
    torch.testing.assert_close(gpu.embed(images, masks=masks), cpu_model.embed(images, masks=masks), atol=1e-4, rtol=0)
    low = _gpu_model("bf16").embed(images, masks=masks)
    assert float((low * cpu_model.embed(images, masks=masks)).sum(-1).min()) >= 0.9999


def test_attention_maps_on_cuda(cpu_model, images):
    mask = torch.zeros(1, 96, 80)
    mask[:, 20:80, 10:70] = 1.0
    gpu = _gpu_model("fp32")
    for m in (None, mask):
        want = cpu_model.attention_map(images[:1], mask=m)
        got = gpu.attention_map(images[:1], mask=m)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
        assert abs(float(got.sum()) - 1.0) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_on_cuda_equals_multihead_attention_form(dtype):
    cfg = HeadConfig(dim=1152, num_heads=16, mlp_dim=4304)
    head, ref = _pair(cfg, seed=3)
    tokens = torch.randn(4, 729, 1152, generator=torch.Generator().manual_seed(4))
    mask = _mask(4, 729, seed=5)
    with torch.no_grad():
        want, want_attn = ref(tokens, mask)  # CPU, fp32, nn.MultiheadAttention
        head = head.cuda()
        t, m = tokens.cuda(), mask.cuda()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            fused = head(t, mask=m)
            emb, attn = head(t, mask=m, return_attention=True)
    tol = 1e-5 if dtype == torch.float32 else None
    if tol is not None:
        torch.testing.assert_close(fused.cpu(), want, atol=tol, rtol=0)
        torch.testing.assert_close(emb.cpu(), want, atol=tol, rtol=0)
        torch.testing.assert_close(attn.cpu(), want_attn, atol=tol, rtol=0)
    else:
        for got in (fused, emb):
            assert float(F.cosine_similarity(got.float().cpu(), want, dim=-1).min()) >= 0.9999
        assert float((attn.float().cpu() - want_attn).abs().max()) < 2e-3
    assert float(attn[~m[:, None, :].expand_as(attn)].abs().max()) == 0.0


def test_node_pack_on_cuda(cpu_model, images, tmp_path):
    pack = import_pack()
    loader, scoring, heatmap = pack.nodes.loader, pack.nodes.scoring, pack.nodes.heatmap
    head = tmp_path / "head.safetensors"
    cpu_model.save_head(head, provenance={"backbone_seed": 0})
    loader.clear_cache()
    gpu, _ = loader.load_cached(str(head), device="cuda", dtype="fp32")
    assert gpu.device.type == "cuda"
    ref, cand = images[:2], images[2:]
    got = scoring.NearIDIdentityScore().score(gpu, cand, reference=ref)["result"][0]
    e_ref, e_cand = cpu_model.embed(ref).numpy(), cpu_model.embed(cand).numpy()
    np.testing.assert_allclose(got, (e_cand @ e_ref.T).mean(1), atol=1e-4)
    low, _ = loader.load_cached(str(head), device="cuda", dtype="bf16")
    got_low = scoring.NearIDIdentityScore().score(low, cand, reference=ref)["result"][0]
    np.testing.assert_allclose(got_low, got, atol=2e-3)
    _, attention, _ = heatmap.NearIDHeatmap().heatmap(gpu, cand[:1], opacity=1.0, colormap="gray")["result"]
    assert attention.shape == (1, 96, 80) and attention.device.type == "cpu"
    loader.clear_cache()
