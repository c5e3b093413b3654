"""`nearid convert` (also `python -m comfy_nearid convert`): the paper's released checkpoint ->
a NearID head file (+ timm backbone). The ComfyUI loader runs the same conversion in memory."""

from __future__ import annotations

import argparse
import json
import sys
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
    from .calibrate import add_data_arguments

    add_data_arguments(parser, required=False)


def run(args: argparse.Namespace) -> int:
    from ..convert import download_release, write_converted
    from ..errors import InvalidInputError
    from .calibrate import calibrate_from_args, has_data_options

    for out in filter(None, (args.out, args.backbone_out)):
        if Path(out).exists() and not args.overwrite:
            raise InvalidInputError(f"{out} exists; pass --overwrite to replace it")
    source = download_release(allow_download=True) if args.from_hub else args.source
    head, bb = write_converted(source, args.out, backbone=args.backbone, out_backbone=args.backbone_out)
    print(json.dumps({"head": str(head), "backbone": str(bb) if bb else None}, indent=2))
    if has_data_options(args):  # calibrate the converted head on the user's data, in place
        if args.backbone_weights is None and bb is not None:
            args.backbone_weights = bb
        calibrate_from_args(args, head, None)
    else:
        print(f"{head} is uncalibrated: its 0-100 match uses the default curve; calibrate it with "
              "`nearid calibrate --head ... --data ROOT --split S` (or give those options here)", file=sys.stderr)
    return 0
