"""MobileNetV2 tokens per second with glibc's default handling of large blocks vs with them
kept for reuse (``comfy_nearid.malloc.keep_freed_memory``, what every ``nearid`` command
does), side by side.

Each mode runs in its own fresh process (the setting is process-wide), alternating, for
``--rounds`` rounds; each process times ``--passes`` backbone passes of ``--batch`` images after
a warm-up and reports its page faults and kernel time.

    python benchmarks/bench_malloc.py                     # batch 8 (the demo's on CPU), 3 rounds
    python benchmarks/bench_malloc.py --batch 16 --rounds 5

Prints one line per process and, per round, the ratio kept / default; then the median and
range of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
import torch
from comfy_nearid.backbones import build_backbone
from comfy_nearid.errors import WeightsNotFoundError
from comfy_nearid.malloc import keep_freed_memory

mode, batch, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
applied = keep_freed_memory() if mode == "kept" else False
try:
    backbone, weights = build_backbone("mobilenet-v2"), "ImageNet"
except WeightsNotFoundError:
    backbone, weights = build_backbone("mobilenet-v2", pretrained=False), "random"
x = torch.randn(batch, 3, backbone.spec.image_size, backbone.spec.image_size)
with torch.inference_mode():
    for _ in range(8):  # warm-up: the heap grows to its working size
        backbone(x)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(passes):
        backbone(x)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"mode": mode, "applied": applied, "weights": weights, "threads": torch.get_num_threads(),
                  "img_per_s": batch * passes / seconds, "page_faults": r1.ru_minflt - r0.ru_minflt,
                  "kernel_s": r1.ru_stime - r0.ru_stime, "user_s": r1.ru_utime - r0.ru_utime}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per backbone pass")
    p.add_argument("--passes", type=int, default=40, help="timed passes per process")
    p.add_argument("--rounds", type=int, default=3, help="default/kept process pairs, alternating")
    return p.parse_args(argv)


def run_child(mode: str, batch: int, passes: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(batch), str(passes)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ratios = []
    print(f"mobilenet-v2 tokens, batch {args.batch}, {args.passes} timed passes per process")
    print("round | mode    | img/s  | page faults | kernel s | user s")
    for r in range(1, args.rounds + 1):
        rows = {mode: run_child(mode, args.batch, args.passes) for mode in ("default", "kept")}
        for mode, row in rows.items():
            print(f"{r:5d} | {mode:7s} | {row['img_per_s']:6.1f} | {row['page_faults']:11d} | "
                  f"{row['kernel_s']:8.2f} | {row['user_s']:6.2f}")
        if not rows["kept"]["applied"]:
            print("keep_freed_memory did not apply here (the C library is not glibc): nothing to compare")
            return 0
        ratios.append(rows["kept"]["img_per_s"] / rows["default"]["img_per_s"])
        print(f"round {r}: kept / default {ratios[-1]:.2f}x ({rows['kept']['weights']} weights, "
              f"{rows['kept']['threads']} threads)")
    ratios.sort()
    print(f"kept / default: median {ratios[len(ratios) // 2]:.2f}x (range {ratios[0]:.2f}x to {ratios[-1]:.2f}x, "
          f"{len(ratios)} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
