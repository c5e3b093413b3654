"""MobileNetV2 tokens per second, three builds of the same weights side by side, at several
batch sizes, on the same pixels and threads:

- unfolded: torchvision's network as it is (convolution, batch norm, ReLU6);
- folded: the batch norms folded into the convolutions (``backbones.fold_batch_norms``);
- registry: folded, and each convolution + ReLU6 run as one oneDNN call on CPU
  (``backbones.fuse_conv_relu6``): what ``build_backbone`` makes.

    python benchmarks/bench_mobilenet.py                    # ImageNet weights if on disk, else random
    python benchmarks/bench_mobilenet.py --batches 8 16 64 --repeats 7

Prints images/s of each and the ratios per batch size (tokens + pooled vector), and the
largest difference of the tokens against the unfolded network (float rounding only). The
three builds' passes alternate (one of each per repeat; the median per build), so a drift of
the machine's speed reaches all three alike. Freed large blocks are kept for reuse
(``comfy_nearid.malloc.keep_freed_memory``, as every ``nearid`` command that runs a backbone
does); ``--default-malloc`` leaves glibc's default, under which page faults dominate.
"""

from __future__ import annotations

import argparse
import copy
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=15, help="timed passes per batch size and network (median)")
    p.add_argument("--default-malloc", action="store_true", help="glibc's default malloc (large blocks not kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def median_seconds(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, their passes alternating (one of each per repeat)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import comfy_nearid.backbones as backbones
    from comfy_nearid.backbones import Backbone, build_backbone, get_backbone_spec
    from comfy_nearid.errors import WeightsNotFoundError

    from comfy_nearid.malloc import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    kept = False if args.default_malloc else keep_freed_memory()
    spec = get_backbone_spec("mobilenet-v2")
    # the unfolded network: the registry's build with the fold and the fusion switched off;
    # the other two: copies of it (so all three hold the same weights, pretrained or random)
    saved = backbones.fold_batch_norms, backbones.fuse_conv_relu6
    backbones.fold_batch_norms = backbones.fuse_conv_relu6 = lambda module: 0
    try:
        try:
            unfolded, weights = build_backbone(spec), "ImageNet"
        except WeightsNotFoundError:
            unfolded, weights = build_backbone(spec, pretrained=False), "random"
    finally:
        backbones.fold_batch_norms, backbones.fuse_conv_relu6 = saved
    folded = Backbone(spec, copy.deepcopy(unfolded.trunk))
    backbones.fold_batch_norms(folded.trunk)
    registry = Backbone(spec, copy.deepcopy(folded.trunk))
    fused = backbones.fuse_conv_relu6(registry.trunk)
    print(f"mobilenet-v2 ({weights} weights), {torch.get_num_threads()} threads, {spec.image_size} px, "
          f"{fused} convolution + ReLU6 pairs fused (oneDNN: {backbones._fused_conv_available()}), "
          f"freed blocks {'kept' if kept else 'returned (glibc default)'}, {args.repeats} alternating repeats")
    with torch.inference_mode():
        x = torch.randn(2, 3, spec.image_size, spec.image_size)
        reference = unfolded(x)
        print(f"max abs token difference folded vs unfolded: {(folded(x) - reference).abs().max().item():.2e}")
        print(f"max abs token difference registry vs unfolded: {(registry(x) - reference).abs().max().item():.2e}")
        print("batch | unfolded img/s | folded img/s | registry img/s | folded / unfolded | registry / folded | registry / unfolded")
        for b in args.batches:
            x = torch.randn(b, 3, spec.image_size, spec.image_size)
            t_unfolded, t_folded, t_registry = median_seconds(
                [lambda: unfolded.tokens_and_pooled(x), lambda: folded.tokens_and_pooled(x),
                 lambda: registry.tokens_and_pooled(x)], args.repeats)
            print(f"{b:5d} | {b / t_unfolded:14.1f} | {b / t_folded:12.1f} | {b / t_registry:14.1f} | "
                  f"{t_unfolded / t_folded:17.2f}x | {t_folded / t_registry:17.2f}x | {t_unfolded / t_registry:19.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
