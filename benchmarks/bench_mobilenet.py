"""MobileNetV2 tokens per second: the registry's backbone (batch norms folded into the
convolutions, ``comfy_nearid.backbones.fold_batch_norms``) vs the same network unfolded,
side by side, at several batch sizes, on the same pixels and threads.

    python benchmarks/bench_mobilenet.py                    # ImageNet weights if on disk, else random
    python benchmarks/bench_mobilenet.py --batches 8 16 64 --repeats 7

Prints images/s of both and their ratio per batch size, and the largest difference of the
tokens (the folded network differs from the unfolded one by float rounding only).
"""

from __future__ import annotations

import argparse
import copy
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=5, help="timed passes per batch size and network (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import comfy_nearid.backbones as backbones
    from comfy_nearid.backbones import Backbone, build_backbone, get_backbone_spec
    from comfy_nearid.errors import WeightsNotFoundError

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_backbone_spec("mobilenet-v2")
    # the unfolded network: the registry's build with the fold switched off; the folded one:
    # a copy of it, folded (so both hold the same weights, pretrained or random)
    saved = backbones.fold_batch_norms
    backbones.fold_batch_norms = lambda module: 0
    try:
        try:
            unfolded, weights = build_backbone(spec), "ImageNet"
        except WeightsNotFoundError:
            unfolded, weights = build_backbone(spec, pretrained=False), "random"
    finally:
        backbones.fold_batch_norms = saved
    folded = Backbone(spec, copy.deepcopy(unfolded.trunk))
    backbones.fold_batch_norms(folded.trunk)
    print(f"mobilenet-v2 ({weights} weights), {torch.get_num_threads()} threads, {spec.image_size} px")
    with torch.inference_mode():
        x = torch.randn(2, 3, spec.image_size, spec.image_size)
        diff = (folded(x) - unfolded(x)).abs().max().item()
        print(f"max abs token difference folded vs unfolded: {diff:.2e}")
        print("batch | unfolded img/s | folded img/s | folded / unfolded")
        for b in args.batches:
            x = torch.randn(b, 3, spec.image_size, spec.image_size)
            t_unfolded = median_seconds(lambda: unfolded.tokens_and_pooled(x), args.repeats)
            t_folded = median_seconds(lambda: folded.tokens_and_pooled(x), args.repeats)
            print(f"{b:5d} | {b / t_unfolded:14.1f} | {b / t_folded:12.1f} | {t_unfolded / t_folded:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
