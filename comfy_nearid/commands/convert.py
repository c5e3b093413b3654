"""`nearid convert` (also `python -m comfy_nearid convert`): the paper's released checkpoint ->
a NearID head file (+ timm backbone). The ComfyUI loader runs the same conversion in memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("source", nargs="?", help="directory holding the release's model.safetensors, or the file")
    src.add_argument("--from-hub", action="store_true",
                     help="download Aleksandar/nearid-siglip2 first (needs network; NEARID_ALLOW_DOWNLOAD=1)")
    parser.add_argument("--out", required=True, help="output head file (.safetensors)")
    parser.add_argument("--backbone", default=None,
                        help="registry backbone the release was trained on (default: detected from its tensor shapes)")
    parser.add_argument("--backbone-out", default=None,
                        help="also write the full backbone in timm layout (usable as --backbone-weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    from ..convert import download_release, write_converted
    from ..errors import InvalidInputError

    for out in filter(None, (args.out, args.backbone_out)):
        if Path(out).exists() and not args.overwrite:
            raise InvalidInputError(f"{out} exists; pass --overwrite to replace it")
    source = download_release(allow_download=True) if args.from_hub else args.source
    head, bb = write_converted(source, args.out, backbone=args.backbone, out_backbone=args.backbone_out)
    print(json.dumps({"head": str(head), "backbone": str(bb) if bb else None}, indent=2))
    return 0
