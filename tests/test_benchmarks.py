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
