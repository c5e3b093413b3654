"""`nearid consistency`: is it the same subject in every image of a set, and which one broke?

Layouts (one of): ``DIR [DIR ...]`` (each folder, searched recursively, is one set) or
``--mapping FILE`` (CSV ``set,images`` or JSON ``{set: paths}``). ``--scorer SPEC`` picks the
embedding (default ``head``: the model of ``--head``/``--backbone``/``--readout``; or a standard
metric ``clip-i``, ``dino-i``, ``dino-i-s8``, ``dinov2``, or ``head:PATH``/``pooled:B``/``mean:B``),
built by :func:`~comfy_nearid.evaluate.scorers.scorer_model` as in ``nearid score``. Writes
``--output`` rows (``.csv``/``.jsonl``), ``<output>.summary.json``, ``<output>.config.json``, the journal
``<output>.sets.jsonl`` and ``<output>.html``. See :mod:`comfy_nearid.consistency` for the rules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="*", type=Path, metavar="DIR", help="folder(s), each one set; not with --mapping")
    parser.add_argument("--mapping", type=Path, default=None, help="CSV (set,images) or JSON {set: paths} of many sets")
    out = parser.add_argument_group("outputs")
    out.add_argument("-o", "--output", type=Path, required=True, help="rows file: .csv or .jsonl")
    out.add_argument("--format", choices=("csv", "jsonl"), default=None, help="rows format (default: from --output)")
    out.add_argument("--html", type=Path, default=None, help="HTML page (default: <output>.html)")
    out.add_argument("--no-html", action="store_true", help="do not write the HTML page")
    out.add_argument("--thumb-size", type=int, default=96, help="longest side of page thumbnails (default: %(default)s)")
    out.add_argument("--html-max-images", type=int, default=200, help="thumbnails per set on the page (default: %(default)s)")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run: finished sets are not redone")
    rule = parser.add_argument_group("outliers and groups")
    rule.add_argument("--threshold", type=float, default=None,
                      help="cosine below which an image is an outlier (vs the medoid) and groups split "
                           "(default: the head's calibrated 50, else the robust z-score rule)")
    rule.add_argument("--outlier-z", type=float, default=3.5,
                      help="robust rule: modified z-score limit (median/MAD) (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--scorer", default="head", metavar="SPEC",
                       help="the embedding of this run: head (the model of --head/--backbone/--readout; the "
                            "default), clip-i, dino-i, dino-i-s8, dinov2, head:PATH.safetensors, pooled:BACKBONE or "
                            "mean:BACKBONE; only a head with a fitted curve gives the calibrated match and threshold")
    model.add_argument("--head", type=Path, default=None, help="NearID head file (.safetensors)")
    model.add_argument("--backbone", default=None, help="registry backbone (default: from the head file)")
    model.add_argument("--backbone-weights", type=Path, default=None, help="backbone weights file")
    model.add_argument("--random-weights", action="store_true", help="random backbone weights (smoke tests)")
    model.add_argument("--seed", type=int, default=0, help="seed of random weights (default: %(default)s)")
    model.add_argument("--readout", choices=("head", "pooled", "mean"), default="head", help="embedding readout")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: %(default)s)")
    model.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16 (default: %(default)s)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    speed.add_argument("--cache", type=Path, default=None, help="embedding cache file (default: as `nearid score`)")
    speed.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")


def _sets(args: argparse.Namespace):
    from ..consistency_run import sets_from_folders, sets_from_mapping

    if args.mapping is not None:
        if args.folders:
            raise InvalidInputError(f"--mapping lists the sets; remove the positional folders {[str(f) for f in args.folders]}")
        return "mapping", sets_from_mapping(args.mapping)
    return "folders", sets_from_folders(args.folders)


def _load_scorer(args: argparse.Namespace):
    """The model of ``--scorer`` (``head``: ``--head``/``--backbone``/``--readout``, as ``nearid score``)."""
    from .. import load_model
    from ..evaluate.scorers import scorer_model

    if args.scorer == "head":
        return load_model(head=args.head, backbone=args.backbone, backbone_weights=args.backbone_weights,
                          pretrained=not args.random_weights, seed=args.seed, readout=args.readout,
                          device=args.device, dtype=args.dtype)
    return scorer_model(args.scorer, device=args.device, dtype=args.dtype, pretrained=not args.random_weights,
                        seed=args.seed)


def _check_scorer(args: argparse.Namespace) -> None:
    """Refuse a bad ``--scorer`` and model options it would ignore, before any model work."""
    from ..evaluate.scorers import parse_scorer_spec

    if args.scorer == "head":
        if args.head is None and args.backbone is None:
            raise InvalidInputError("give --head (a NearID head file) or --backbone (with --random-weights for tests), "
                                    "or a --scorer such as clip-i, dino-i, dinov2")
        return
    kind, _ = parse_scorer_spec(args.scorer)  # names the value when it is not a spec
    if kind == "feature":
        raise InvalidInputError(f"--scorer {args.scorer}: feature scorers need object masks; "
                                "they serve `nearid eval` only")
    ignored = [flag for flag, given in (("--head", args.head is not None), ("--backbone", args.backbone is not None),
                                        ("--backbone-weights", args.backbone_weights is not None),
                                        ("--readout", args.readout != "head")) if given]
    if ignored:
        raise InvalidInputError(f"--scorer {args.scorer} builds its own model; {', '.join(ignored)} belong to "
                                "--scorer head (the default): remove them or drop --scorer")


def run(args: argparse.Namespace) -> int:
    from ..consistency_run import ConsistencyOptions, ConsistencyOutputs, consistency_run
    from ..embedding_cache import EmbeddingCache, default_cache_path

    layout, sets = _sets(args)  # input problems stop here, before any model work
    _check_scorer(args)
    outputs = ConsistencyOutputs.for_rows(args.output, args.format, False if args.no_html else (args.html or True))
    options = ConsistencyOptions(threshold=args.threshold, outlier_z=args.outlier_z, batch_size=args.batch_size,
                                 thumb_size=args.thumb_size, html_max_images=args.html_max_images)
    outputs.check_writable()
    model = _load_scorer(args)
    cache = None if args.no_cache else EmbeddingCache(args.cache or default_cache_path())
    run_config = {"layout": layout, "argv": sys.argv[1:], "cache": None if cache is None else str(cache.path),
                  "model": {"head": None if args.head is None else str(args.head), "backbone": args.backbone,
                            "random_weights": args.random_weights, "seed": args.seed, "readout": args.readout}}
    try:
        summary = consistency_run(model, sets, outputs, options=options, cache=cache, resume=args.resume,
                                  overwrite=args.overwrite, run_config=run_config, scorer=args.scorer)
    finally:
        if cache is not None:
            cache.close()
    width = max([3, *(len(n) for n in summary["sets"])])
    fmt = lambda v: f"{v:7.4f}" if v is not None else f"{'-':>7s}"  # noqa: E731
    print(f"{'set':{width}s}  {'images':>6s}  {'mean':>7s}  {'min':>7s}  {'match':>6s}  outliers  groups")
    for name, s in summary["sets"].items():
        match = s.get("calibrated_match")
        outliers = ",".join(str(i + 1) for i in s.get("outliers", [])) or "-"
        print(f"{name:{width}s}  {s['num_images']:6d}  {fmt(s.get('mean_pairwise'))}  {fmt(s.get('min_pairwise'))}  "
              f"{'-' if match is None else f'{match:6.1f}':>6s}  {outliers:8s}  {s['description']}")
    print(f"scorer {summary['scorer']}; {summary['num_sets']} set(s), {summary['num_images']} image(s), "
          f"{summary['num_errors']} unreadable; rows: {outputs.rows}; summary: {outputs.summary}"
          + (f"; page: {outputs.html}" if outputs.html else ""))
    return 0
