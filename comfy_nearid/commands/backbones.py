"""`nearid backbones`: registered backbones and where their weights are looked for."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", action="store_true", help="also show where weights are looked for")


def run(args: argparse.Namespace) -> int:
    from ..backbones import get_backbone_spec, list_backbones
    from ..errors import WeightsNotFoundError
    from ..weights import resolve_backbone_weights

    for name in list_backbones():
        spec = get_backbone_spec(name)
        gh, gw = spec.grid_size
        print(f"{name:16s} {spec.family:13s} {spec.image_size}px  {gh}x{gw} tokens x {spec.embed_dim}  {spec.description}")
        if args.weights:
            if not spec.has_pretrained:
                print("    weights: random init only")
                continue
            try:
                print(f"    weights: {resolve_backbone_weights(spec)}")
            except WeightsNotFoundError as e:
                print("    weights: not found. " + str(e).replace("\n", "\n    "))
    return 0
