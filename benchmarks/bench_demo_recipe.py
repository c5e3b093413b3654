"""The default demo with one lever changed: training recipe or token construction (issue 21).

Each call is the real ``nearid demo`` (generation, frozen baselines, training from the feature
cache, scoring of the held-out test categories), with at most these changes:

- ``--data DIR``: the benchmark is not generated but hard-linked from ``DIR`` (a previous
  demo's ``data/`` of the same seed: the generator writes the same bytes for the same seed);
- ``--cache DIR``: the trainer's feature cache is hard-linked from ``DIR`` (a previous run's
  ``train/feature_cache`` of the same data and tokens: its rows are keyed by image content);
- recipe: ``--epochs``, ``--lr``, ``--temperature``, ``--alpha``, ``--weight-decay``;
- ``--tokens``: a variant of the ``mobilenet-v2`` tokens, for this process only: ``s8cells``
  (the stride-8 map's 2x2 cells side by side, 128 values, instead of their mean, 32: 390-d),
  ``rgbcells`` (the colour statistics of each token's four 8x8 sub-cells, 24 values, instead
  of the 16x16 cell's 6: 312-d). The registry's tokens (``v2``) are the default.

It prints one ``RESULT {json}`` line: SSR / PA per test level, the best step and the timings.

    python benchmarks/bench_demo_recipe.py --out runs/r0                          # = nearid demo
    python benchmarks/bench_demo_recipe.py --out runs/r1 --data runs/r0/data \\
        --cache runs/r0/train/feature_cache --epochs 12
    python benchmarks/bench_demo_recipe.py --out runs/r2 --data runs/r0/data --tokens s8cells
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

TOKEN_WIDTHS = {"v2": 294, "s8cells": 390, "rgbcells": 312}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (replaced if it holds a demo run)")
    p.add_argument("--data", default=None, help="hard-link this generated benchmark instead of generating")
    p.add_argument("--cache", default=None, help="hard-link this feature cache into the run's train/feature_cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="the fixed plan's epochs (default: the demo's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--alpha", type=float, default=None, help="weight of the second tier")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--tokens", choices=sorted(TOKEN_WIDTHS), default="v2")
    return p.parse_args(argv)


def use_token_variant(name: str) -> None:
    """Swap the mobilenet-v2 token construction (and width) for this process."""
    import torch
    import torch.nn.functional as F

    import comfy_nearid.backbones as backbones

    if name == "v2":
        return
    registry = backbones._registry()
    spec = registry["mobilenet-v2"]
    width = TOKEN_WIDTHS[name]
    registry["mobilenet-v2"] = replace(spec, embed_dim=width, head=replace(spec.head, dim=width))

    def tokens(self, pixels):
        feats = self.trunk.features
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        s8 = feats[:7](pixels)
        s16 = feats[7:14](s8)
        s32 = feats[14:17](s16)
        grid = s16.shape[-2:]
        fine = F.pixel_unshuffle(s8, 2) if name == "s8cells" else F.avg_pool2d(s8, 2)
        maps = [s16, F.interpolate(s32, size=grid, mode="nearest"), fine]
        maps = [F.layer_norm(m.permute(0, 2, 3, 1), m.shape[1:2]) for m in maps]
        if name == "rgbcells":
            mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1)
            std = torch.tensor(self.spec.std).view(1, 3, 1, 1)
            rgb = pixels * std + mean
            m = F.avg_pool2d(rgb, 8)
            sd = (F.avg_pool2d(rgb.square(), 8) - m.square()).clamp_min(0).sqrt()
            colour = F.pixel_unshuffle(torch.cat([m, sd], dim=1), 2).permute(0, 2, 3, 1)
        else:
            colour = backbones._cell_colour(pixels, self.spec, grid)
        return torch.cat([*maps, colour.to(maps[0].dtype)], dim=-1).flatten(1, 2), s32

    backbones.Backbone._mobilenet_tokens = tokens


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("PIL").setLevel(logging.INFO)
    use_token_variant(args.tokens)

    import comfy_nearid.data as data
    import comfy_nearid.demo as demo
    import trainer.demo as trainer_demo

    if args.data is not None:
        source = Path(args.data)

        def link_benchmark(out_dir, *_, **__):
            shutil.copytree(source, out_dir, copy_function=os.link)

        data.generate_benchmark = link_benchmark
    if args.epochs is not None:
        demo.PRESETS["default"] = replace(demo.PRESETS["default"], epochs=args.epochs)
    base_config = trainer_demo.demo_train_config

    def config(settings, out, epochs, steps, device_type):
        c = base_config(settings, out, epochs, steps, device_type)
        for value, (section, name) in ((args.lr, ("optim", "lr")), (args.temperature, ("loss", "temperature")),
                                       (args.alpha, ("loss", "alpha")), (args.weight_decay, ("optim", "weight_decay"))):
            if value is not None:
                setattr(getattr(c, section), name, value)
        if args.cache is not None:
            shutil.copytree(args.cache, c.features.cache_dir, copy_function=os.link)
        return c

    trainer_demo.demo_train_config = config
    result = trainer_demo.run_demo(args.out, overwrite=True, progress=False, seed=args.seed)
    head = next(name for name in result.levels["object"] if name.startswith("head"))
    line = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data", "cache")},
        **{level: {"ssr": round(result.levels[level][head]["ssr"], 1), "pa": round(result.levels[level][head]["pa"], 1)}
           for level in ("object", "colour", "part", "all")},
        "steps": result.train.global_step, "best_step": result.train.best_step,
        "targets_met": result.targets["met"], "timings": result.timings,
    }
    print("RESULT", json.dumps(line))


if __name__ == "__main__":
    main()
