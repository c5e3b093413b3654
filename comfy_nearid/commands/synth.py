"""`nearid synth`: generate the synthetic near-identity benchmark.

Writes ``--out`` in the folder layout (``train/``, ``test/``, ``mtg_test/``) with
``manifest.json``, which records the generator version and the resolved configuration.
Example: ``nearid synth --out data/synth --train 2000 --test 500 --seed 0 --workers 8``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import InvalidInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty or a benchmark)")
    parser.add_argument("--train", type=int, default=1000, help="training identities (default: %(default)s)")
    parser.add_argument("--test", type=int, default=200, help="test identities (default: %(default)s)")
    parser.add_argument("--mtg", type=int, default=None, help="MTG-style test samples (default: as many as --test)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--views", type=int, default=3, help="views per identity (default: %(default)s)")
    parser.add_argument("--levels", default="object,part,colour",
                        help="distractor levels, comma-separated, from object, part, colour (default: %(default)s)")
    parser.add_argument("--object-fill", type=float, nargs=2, default=(0.45, 0.72), metavar=("LOW", "HIGH"),
                        help="diameter of the disc holding the object, as a fraction of the image side "
                             "(default: 0.45 0.72; the object's bounding box then spans ~35-65%%)")
    parser.add_argument("--workers", type=int, default=1, help="processes (same bytes for any count; default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a benchmark already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.synth import generate_benchmark

    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    if not levels:
        raise InvalidInputError(f"--levels must name at least one of object, part, colour; got {args.levels!r}")
    start = time.perf_counter()
    manifest = generate_benchmark(
        args.out,
        n_train=args.train,
        n_test=args.test,
        image_size=args.size,
        seed=args.seed,
        n_mtg=args.mtg,
        n_views=args.views,
        levels=levels,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        object_fill=tuple(args.object_fill),
    )
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    rate = manifest["rgb_images"] / seconds if seconds > 0 else float("inf")
    print(f"wrote {args.out}: {counts} identities, {manifest['rgb_images']} images in {seconds:.1f} s ({rate:.0f} images/s)")
    print(f"manifest (seed, sizes, resolved config): {Path(args.out) / 'manifest.json'}")
    return 0
