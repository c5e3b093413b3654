"""The benchmark scripts run (smoke mode on the CPU) and their arithmetic is right.

Timings are not checked (the machine may be busy); what is checked is that every part of the
GPU suite runs end to end on a tiny model and prints its result line, and that the FLOPs
behind the roofline figure agree with torch's own FLOP counter on the real model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_embed  # noqa: E402
import bench_gpu  # noqa: E402


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_vit_flops_per_image_equals_torch_flop_counter(size):
    from comfy_nearid import load_model

    name, side, shape = bench_embed.SIZES[size]
    model = load_model(backbone=name, pretrained=False, device="cpu", dtype="fp32")
    pixels = torch.zeros(1, 3, side, side)
    for block in model.backbone.trunk.blocks:  # explicit q @ k^T and attn @ v, which the counter sees
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.backbone.trunk.forward_features(pixels)
    assert bench_embed.vit_flops_per_image(shape, side) == counter.get_total_flops()


def test_card_peak_table_matches_specific_names_first():
    assert bench_embed.card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_embed.card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_embed.card_peak_tflops("NVIDIA L40S") == 362.0
    assert bench_embed.card_peak_tflops("NVIDIA L4") == 121.0
    assert bench_embed.card_peak_tflops("Some Future GPU") is None


def test_gpu_suite_smoke_runs_every_part_on_cpu(capsys):
    assert bench_gpu.main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    for marker in ("fp32: ours/transformers", "bf16: ours/transformers", "[2] training step from the feature cache",
                   "[3] Identity Score node", "of the model's speed (target >= 0.90)"):
        assert marker in out, f"missing {marker!r} in:\n{out}"


def test_gpu_suite_refuses_cuda_without_a_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert bench_gpu.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["s8cells", "rgbcells"])
def test_demo_recipe_token_variants_change_only_their_group(variant):
    """bench_demo_recipe's token variants: the registered width, the stride-16/32 groups
    unchanged, and the changed group recomputed here from the stride-8 map / the pixels."""
    import torch.nn.functional as F

    import bench_demo_recipe
    import comfy_nearid.backbones as backbones
    from comfy_nearid.model import load_model

    registry = backbones._registry()
    saved_spec, saved_tokens = registry["mobilenet-v2"], backbones.Backbone._mobilenet_tokens
    pixels = torch.randn(2, 3, 224, 224)
    try:
        v2 = load_model(backbone="mobilenet-v2", pretrained=False, device="cpu", readout="mean", seed=0)
        expected_v2 = v2.backbone(pixels)
        bench_demo_recipe.use_token_variant(variant)
        model = load_model(backbone="mobilenet-v2", pretrained=False, device="cpu", readout="mean", seed=0)
        tokens = model.backbone(pixels)
        width = bench_demo_recipe.TOKEN_WIDTHS[variant]
        assert tokens.shape == (2, 196, width) and model.spec.head.dim == width
        assert torch.allclose(tokens[..., :256], expected_v2[..., :256], atol=1e-5)
        if variant == "s8cells":
            with torch.no_grad():
                s8 = model.backbone.trunk.features[:7](pixels)  # [2, 32, 28, 28]
            cells = s8.reshape(2, 32, 14, 2, 14, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 196, 128)
            assert torch.allclose(tokens[..., 256:384], F.layer_norm(cells, (128,)), atol=1e-4)
        else:
            rgb = pixels * torch.tensor(model.spec.std).view(1, 3, 1, 1) + torch.tensor(model.spec.mean).view(1, 3, 1, 1)
            cell = rgb[0, :, 8:16, 16:24]  # token (0, 1), its sub-cell (row 1, column 0)
            got = tokens[0, 1, 288:].reshape(6, 4)[:, 2]  # channel-major, 2x2 sub-cells row-major
            want = torch.cat([cell.mean(dim=(1, 2)), cell.std(dim=(1, 2), unbiased=False)])
            assert torch.allclose(got, want, atol=1e-4)
    finally:
        registry["mobilenet-v2"] = saved_spec
        backbones.Backbone._mobilenet_tokens = saved_tokens


def test_mobilenet_fold_benchmark_runs_and_compares_the_same_network(capsys):
    import bench_mobilenet

    assert bench_mobilenet.main(["--batches", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for build in ("folded", "registry"):
        diff = float(out.split(f"{build} vs unfolded: ")[1].split()[0])
        assert diff < 1e-3  # the same weights, folded (and fused): float rounding only
    assert "35 convolution + ReLU6 pairs fused" in out
    assert "registry / folded" in out and out.strip().splitlines()[-1].startswith("    2 |")


def test_malloc_benchmark_compares_both_modes_in_fresh_processes(capsys):
    import platform

    import bench_malloc

    assert bench_malloc.main(["--batch", "2", "--passes", "2", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("    1 |")}
    assert set(rows) == {"default", "kept"}
    assert all(int(row.split("|")[3]) >= 0 for row in rows.values())  # page faults column
    if platform.libc_ver()[0] == "glibc":
        assert lines[-1].startswith("kept / default: median ")


def test_feature_cache_build_benchmark_compares_both_cpu_paths_on_the_same_images(tmp_path, capsys):
    """--compare-build: both paths embed the same images into the same rows (masks equal,
    tokens equal up to float rounding) and the ratio line is printed."""
    import bench_feature_cache

    from comfy_nearid.data.synth import generate_benchmark

    data = tmp_path / "bench"
    generate_benchmark(data, 4, 1, image_size=64, n_mtg=0, seed=0, progress=False, workers=1)
    before = torch.get_num_threads()
    try:
        assert bench_feature_cache.main(["--compare-build", "--data", str(data), "--backbone", "tiny-siglip",
                                         "--no-pretrained", "--images", "30", "--rounds", "1", "--image-batch", "4",
                                         "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "30 images of" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("ratio median ") and "same masks: True" in last
    assert float(last.split("largest difference ")[1]) < 1e-2
