"""Embedding throughput: ours vs the transformers reference on the same converted weights.

Builds a SigLIP-architecture model with random weights in transformers' SiglipVisionModel,
converts it with our converter, and times both forwards on the same pixels, same device and
thread count, interleaved in one run. For each precision it prints img/s of the reference
and of ours, the ratio ours/reference, how far apart the two embeddings are (max abs diff,
min cosine) and the min cosine to the fp32 reference. ``--compile`` adds both models under
``torch.compile`` (inductor); on CUDA it also prints peak memory and the fraction of the
card's dense bf16/fp16 peak (the roofline) reached, from the FLOPs per image of the config.

    python benchmarks/bench_embed.py                                  # CPU: small-siglip, fp32 + bf16
    python benchmarks/bench_embed.py --device cuda --size so400m --batch 64 --dtypes bf16 fp16 fp32 --compile
    python benchmarks/bench_embed.py --size tiny --repeats 1          # smoke run (seconds)

Precisions: ``fp32`` (both in fp32), ``bf16``/``fp16``: on CUDA both models hold their
weights in that dtype (ours: ``load_model(dtype=...)``, transformers: ``.to(dtype)``); on CPU
ours runs bf16 autocast (the library's CPU bf16 path) and the reference is cast to bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = {
    # name: (registry backbone, image side, transformers SiglipVisionConfig shape)
    "tiny": ("tiny-siglip", 30, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=30, patch_size=4)),
    "small": ("small-siglip", 224, dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                        num_attention_heads=6, image_size=224, patch_size=16)),
    "so400m": ("siglip2-so400m", 384, dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                           num_attention_heads=16, image_size=384, patch_size=14)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) tensor-core peak for bf16/fp16 with fp32 accumulation, TFLOP/s, from the
# vendors' data sheets. Matched against torch.cuda.get_device_name() in this order.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
]


def vit_flops_per_image(shape: dict, side: int) -> float:
    """Forward FLOPs of one image through the ViT trunk (2 per multiply-add); head excluded.

    Per layer with N tokens, width D, MLP width I: q, k, v and output projections 4*N*D^2,
    attention scores and the weighted sum 2*N^2*D, MLP 2*N*D*I (multiply-adds)."""
    d, i, layers, p = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["patch_size"]
    n = (side // p) ** 2
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * i
    patch_embed = n * 3 * p * p * d
    return 2.0 * (layers * per_layer + patch_embed)


def card_peak_tflops(name: str) -> float | None:
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def _reference(cfg_kwargs: dict):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**cfg_kwargs, attn_implementation="sdpa")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="tiny: tiny-siglip (smoke); small: small-siglip (width 384, 6 layers, 224 px); "
                         "so400m: the paper's full-size architecture (random weights, 384 px)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    ap.add_argument("--repeats", type=int, default=5)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    from safetensors.torch import save_file

    from comfy_nearid import load_model
    from comfy_nearid.convert import write_converted

    name, side, shape = SIZES[args.size]
    ref32 = _reference(dict(**shape, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6))
    torch.manual_seed(1)
    pixels = (torch.rand(args.batch, 3, side, side) * 2 - 1).to(device)

    runs: dict[str, callable] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "rel").mkdir()
        save_file({f"backbone.{k}": v.contiguous() for k, v in ref32.state_dict().items()}, str(tmp / "rel" / "model.safetensors"))
        head, bb = write_converted(tmp / "rel", tmp / "head.safetensors", backbone=name, out_backbone=tmp / "bb.safetensors")
        for dt in args.dtypes:
            ours = load_model(head, backbone_weights=bb, device=device, dtype=dt)
            ref = _reference(dict(**shape, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)).to(device, DTYPES[dt])

            def run_ref(ref=ref, dt=dt, forward=None):
                with torch.inference_mode():
                    out = (forward or ref)(pixel_values=pixels.to(DTYPES[dt])).pooler_output
                    return F.normalize(out.float(), dim=-1)

            runs[f"transformers {dt}"] = run_ref
            runs[f"ours {dt}"] = lambda ours=ours: ours.embed_pixels(pixels)
            if args.compile:
                compiled_ref = torch.compile(ref)
                runs[f"transformers {dt} compiled"] = lambda run_ref=run_ref, c=compiled_ref: run_ref(forward=c)
                compiled = load_model(head, backbone_weights=bb, device=device, dtype=dt)
                compiled.backbone.trunk.forward_features = torch.compile(compiled.backbone.trunk.forward_features)
                runs[f"ours {dt} compiled"] = lambda m=compiled: m.embed_pixels(pixels)
    del ref32

    outputs, peak_mib = {}, {}
    for k, f in runs.items():  # warm-up (and compilation) + results, with each run's peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        outputs[k] = f().float().cpu()
        _sync(device)
        if k.endswith("compiled"):
            print(f"  compiled {k!r} in {time.perf_counter() - started:.1f} s", flush=True)
        if device.type == "cuda":
            peak_mib[k] = torch.cuda.max_memory_allocated(device) / 2**20
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    flops = vit_flops_per_image(shape, side)
    peak = card_peak_tflops(card) if device.type == "cuda" else None
    load = os.getloadavg()[0]
    print(f"{name} ({shape['hidden_size']} wide, {shape['num_hidden_layers']} layers, {side} px), batch {args.batch}, "
          f"device {card}, {args.threads} CPU threads, median of {args.repeats}, load average {load:.2f}")
    print(f"  FLOPs per image (trunk forward): {flops / 1e9:.1f} GFLOP; card peak (bf16/fp16 dense): "
          f"{'unknown card' if peak is None else f'{peak:.0f} TFLOP/s'}" if device.type == "cuda" else
          f"  FLOPs per image (trunk forward): {flops / 1e9:.2f} GFLOP")
    fp32_ref = outputs.get("transformers fp32")
    for k in runs:
        ips = args.batch / med[k]
        extra = ""
        if device.type == "cuda":
            extra += f"  peak {peak_mib[k]:8.0f} MiB"
            if peak is not None and not k.split()[1] == "fp32":
                extra += f"  {100 * ips * flops / (peak * 1e12):5.1f}% of roofline"
        print(f"  {k:28s} {med[k] * 1000:9.1f} ms/batch  {ips:8.1f} img/s{extra}")
    for dt in args.dtypes:
        ref_out, ours_out = outputs[f"transformers {dt}"], outputs[f"ours {dt}"]
        ratio = med[f"transformers {dt}"] / med[f"ours {dt}"]
        line = (f"{dt}: ours/transformers {ratio:.2f}x (target >= 1.0x); ours vs transformers max abs diff "
                f"{float((ours_out - ref_out).abs().max()):.2e}, min cosine {float((ours_out * ref_out).sum(-1).min()):.6f}")
        if fp32_ref is not None and dt != "fp32":
            line += f"; ours vs fp32 reference: {med['transformers fp32'] / med[f'ours {dt}']:.2f}x faster, " \
                    f"min cosine {float((ours_out * fp32_ref).sum(-1).min()):.6f}"
        print(line)
        if args.compile:
            for who in ("ours", "transformers"):
                c = f"{who} {dt} compiled"
                same = float((outputs[c] - outputs[f"{who} {dt}"]).abs().max())
                print(f"    torch.compile {who} {dt}: {med[f'{who} {dt}'] / med[c]:.2f}x vs eager "
                      f"(max abs diff to eager {same:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
