"""Embedding throughput: ours vs the transformers reference on the same converted weights.

Builds a mid-size SigLIP-architecture model (the registry's `small-siglip`: width 384,
6 layers, 224 px, patch 16) with random weights in transformers' SiglipVisionModel, converts
it with our converter, and times both forwards on the same pixels, same thread count,
interleaved in one run. Prints the fp32 ratio (ours / reference throughput, with the max
abs difference of the embeddings) and our bf16-autocast path against the fp32 reference
(speed ratio and the minimum cosine between bf16 and fp32 embeddings).

    python benchmarks/bench_embed.py [--batch 8] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _reference(cfg_kwargs):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**cfg_kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", choices=["small", "so400m"], default="small",
                    help="small: small-siglip (width 384, 6 layers, 224 px); so400m: the paper's full-size "
                         "architecture (random weights, 384 px)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from safetensors.torch import save_file

    from comfy_nearid import load_model
    from comfy_nearid.convert import write_converted

    if args.size == "small":
        name, side = "small-siglip", 224
        shape = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                     image_size=224, patch_size=16)
    else:
        name, side = "siglip2-so400m", 384
        shape = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)
    ref = _reference(dict(**shape, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "rel").mkdir()
        save_file({f"backbone.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(tmp / "rel" / "model.safetensors"))
        head, bb = write_converted(tmp / "rel", tmp / "head.safetensors", backbone=name, out_backbone=tmp / "bb.safetensors")
        ours = load_model(head, backbone_weights=bb, device="cpu", dtype="fp32")
        ours_bf16 = load_model(head, backbone_weights=bb, device="cpu", dtype="bf16")

    torch.manual_seed(1)
    pixels = torch.rand(args.batch, 3, side, side) * 2 - 1

    def run_ref():
        with torch.inference_mode():
            return F.normalize(ref(pixel_values=pixels).pooler_output, dim=-1)

    runs = {"reference fp32": run_ref, "ours fp32": lambda: ours.embed_pixels(pixels),
            "ours bf16 autocast": lambda: ours_bf16.embed_pixels(pixels)}
    outputs = {k: f() for k, f in runs.items()}  # warm-up + results
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_out = outputs["reference fp32"]
    print(f"{name} ({shape['hidden_size']} wide, {shape['num_hidden_layers']} layers, {side} px), batch {args.batch}, {args.threads} threads, "
          f"median of {args.repeats}")
    for k in runs:
        print(f"  {k:20s} {med[k] * 1000:8.1f} ms/batch  {args.batch / med[k]:7.1f} img/s")
    diff = float((outputs["ours fp32"] - ref_out).abs().max())
    cos = float((outputs["ours bf16 autocast"] * ref_out).sum(-1).min())
    print(f"fp32 throughput ratio ours/reference: {med['reference fp32'] / med['ours fp32']:.2f}x "
          f"(max abs diff of embeddings {diff:.2e})")
    print(f"bf16 autocast vs fp32 reference: {med['reference fp32'] / med['ours bf16 autocast']:.2f}x faster, "
          f"min cosine to fp32 {cos:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
