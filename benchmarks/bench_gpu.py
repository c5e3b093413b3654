"""The GPU suite's benchmarks in one run (``benchmarks/gpu.sh`` calls this, then the cuda tests).

Random weights throughout; nothing is downloaded. On one GPU the default run takes ~5 minutes:

1. embedding, ``siglip2-so400m`` at 384 px, batch 64: ours vs transformers'
   ``SiglipVisionModel`` at bf16, fp16 and fp32, ``torch.compile`` on and off, the fraction of
   the card's bf16 roofline, peak memory (``bench_embed.py``);
2. one training step from the feature cache (SO400M token shapes, 64 samples x 6 slots): the
   head in its former ``nn.MultiheadAttention`` form vs the single-query form, same weights;
3. the ComfyUI Identity Score node's latency for 4 candidates at 1024 px (1 reference);
4. ``nearid score`` end to end vs the best model-only throughput on 2,000 JPEGs
   (``bench_scoring.py --only throughput``).

    python benchmarks/bench_gpu.py                           # on the GPU
    python benchmarks/bench_gpu.py --device cpu --tiny       # smoke run of every part (tests)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARTS = ("embed", "train", "node", "score")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny-siglip and small counts: checks that every part runs")
    ap.add_argument("--only", choices=PARTS, action="append", default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; tiny: 1)")
    return ap.parse_args(argv)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, device) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_embed(args: argparse.Namespace) -> None:
    import bench_embed

    if args.tiny:
        argv = ["--size", "tiny", "--batch", "4", "--dtypes", "fp32", "bf16", "--repeats", str(args.repeats)]
    else:
        argv = ["--size", "so400m", "--batch", "64", "--dtypes", "bf16", "fp16", "fp32", "--compile",
                "--repeats", str(args.repeats)]
    print("[1] embedding: bench_embed.py " + " ".join(["--device", args.device, *argv]), flush=True)
    bench_embed.main(["--device", args.device, *argv])


def bench_train_step(args: argparse.Namespace) -> None:
    """One optimiser step of the head on cached tokens: MHA form vs single-query form."""
    import torch

    from bench_feature_cache import mha_head_forward
    from comfy_nearid.backbones import get_backbone_spec
    from comfy_nearid.head import NearIDHead
    from trainer.losses import two_tier_infonce
    from trainer.loop import slot_embeddings

    spec = get_backbone_spec("tiny-siglip" if args.tiny else "siglip2-so400m")
    samples, positives, negatives = (4, 2, 3) if args.tiny else (64, 2, 3)
    slots = 1 + positives + negatives
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batch = {  # what the feature cache hands the step: fp16 tokens, every slot present
        "tokens": torch.randn(samples, slots, spec.num_tokens, spec.embed_dim, generator=g).half().to(device),
        "valid": torch.ones(samples, slots, dtype=torch.bool, device=device),
    }
    torch.manual_seed(0)
    head = NearIDHead(spec.head).to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)

    def step() -> None:
        emb = slot_embeddings(head, None, batch, torch.float16)
        loss = two_tier_infonce(emb[:, 0], emb[:, 1 : 1 + positives], emb[:, 1 + positives :],
                                batch["valid"][:, 1 : 1 + positives], batch["valid"][:, 1 + positives :])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    single = _median_seconds(step, args.repeats, device)
    peak_single = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    single_query_forward = NearIDHead.forward
    NearIDHead.forward = mha_head_forward
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mha = _median_seconds(step, args.repeats, device)
        peak_mha = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    finally:
        NearIDHead.forward = single_query_forward
    mem = "" if peak_single is None else f"; peak memory {peak_mha:.0f} vs {peak_single:.0f} MiB"
    print(f"[2] training step from the feature cache ({spec.name} tokens {spec.num_tokens}x{spec.embed_dim}, "
          f"{samples} samples x {slots} slots): MHA form {mha * 1000:.1f} ms, single-query {single * 1000:.1f} ms, "
          f"{mha / single:.2f}x{mem}", flush=True)


def bench_node(args: argparse.Namespace) -> None:
    """Latency of the Identity Score node for 4 candidates at 1024 px against 1 reference."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from _comfyui_helpers import import_pack, to_comfy  # the pack imported the way ComfyUI does

    from comfy_nearid import load_model

    pack = import_pack()
    side = 64 if args.tiny else 1024
    model = load_model(backbone="tiny-siglip" if args.tiny else "siglip2-so400m", pretrained=False, device=args.device)
    rng = np.random.default_rng(0)
    candidates = to_comfy(rng.integers(0, 256, size=(4, side, side, 3), dtype=np.uint8))
    reference = to_comfy(rng.integers(0, 256, size=(1, side, side, 3), dtype=np.uint8))
    node = pack.nodes.scoring.NearIDIdentityScore()
    seconds = _median_seconds(lambda: node.score(model, candidates, reference=reference), args.repeats, model.device)
    print(f"[3] Identity Score node, {model.spec.name} ({str(model.dtype).replace('torch.', '')}) on {model.device}: "
          f"4 candidates + 1 reference at {side} px: {seconds * 1000:.0f} ms (median of {args.repeats})", flush=True)
    del torch


def bench_score(args: argparse.Namespace) -> None:
    import bench_scoring

    if args.tiny:
        argv = ["--images", "24", "--side", "64", "--backbone", "tiny-siglip", "--sweep", "4", "8"]
    else:
        argv = ["--images", "2000", "--side", "512", "--backbone", "siglip2-so400m"]
    argv += ["--only", "throughput", "--device", args.device, "--repeats", str(min(args.repeats, 3))]
    print("[4] nearid score vs model-only: bench_scoring.py " + " ".join(argv), flush=True)
    with tempfile.TemporaryDirectory(prefix="nearid-gpu-score-") as tmp:
        bench_scoring.main([*argv, "--workdir", tmp])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 5
    sys.path.insert(0, str(BENCH))
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --device cpu --tiny for a smoke run")
        return 2
    card = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    print(f"device {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    parts = {"embed": bench_embed, "train": bench_train_step, "node": bench_node, "score": bench_score}
    for name in args.only or PARTS:
        started = time.perf_counter()
        parts[name](args)
        print(f"    ({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
