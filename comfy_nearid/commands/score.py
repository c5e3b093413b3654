"""`nearid score`: score folders of generated images against their subjects' references.

Layouts (one of):

- ``--reference REF [--reference REF2 ...] GEN_DIR [GEN_DIR ...]``: one subject; a reference
  is an image or a folder of images.
- ``--mapping FILE``: many subjects from a CSV/JSON mapping (subject -> references, generated);
  its further columns (``checkpoint``, ``method``, ...) become columns of the rows.
- ``--references-root REFS GEN_DIR [...]``: DreamBench-style: each sub-folder of ``REFS`` with
  images is a subject; its generated images are in the folder of the same name in ``GEN_DIR``.

Writes ``--output`` (``.csv`` or ``.jsonl``) row by row, then ``<output>.summary.json``, the
resolved config ``<output>.config.json`` and optionally ``--dreambench-json``. ``--scorer``
(repeatable) adds the field's standard metrics (``clip-i``, ``dino-i``, ``dinov2``, ...) or any
scorer spec as ``score:<name>`` columns next to the first scorer's ``score``. Runs on several
processes (one machine or many) with ``accelerate launch -m comfy_nearid score ...``.

Shards (img2dataset parquet, webdataset ``.tar``; paths, globs or fsspec URLs) and
``--engine ray`` runs are partitioned: ``--output`` is a folder with one parquet file per
partition, ``_summary.json`` and ``_config.json`` (see docs/scale.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("generated", nargs="*", type=Path, metavar="GEN_DIR",
                        help="folder(s) of generated images (searched recursively); not with --mapping")
    layout = parser.add_argument_group("subjects (choose one layout)")
    layout.add_argument("--reference", action="append", type=Path, default=[], metavar="PATH",
                        help="reference image or folder of the single subject; repeatable")
    layout.add_argument("--subject", default=None,
                        help="name of the single subject (default: the reference's name)")
    layout.add_argument("--mapping", type=Path, default=None,
                        help="CSV (subject,references,generated) or JSON mapping of many subjects")
    layout.add_argument("--references-root", type=Path, default=None, metavar="DIR",
                        help="one reference folder per subject; GEN_DIR holds folders of the same names")

    out = parser.add_argument_group("outputs")
    out.add_argument("-o", "--output", type=Path, required=True, help="rows file: .csv or .jsonl; a folder for partitioned runs")
    out.add_argument("--format", choices=("csv", "jsonl"), default=None, help="rows format (default: from --output)")
    out.add_argument("--summary", type=Path, default=None,
                     help="per-subject summary JSON (default: <output>.summary.json)")
    out.add_argument("--dreambench-json", type=Path, default=None, metavar="PATH",
                     help="also write {relative path with '/' -> '-': 100 x cosine}, readable by `nearid eval human`; "
                          "with several --scorer the path holds {scorer} (e.g. metrics/{scorer}/emu2.json): one "
                          "file per scorer")
    out.add_argument("--aggregate", choices=("mean", "max", "prototype"), default="mean",
                     help="how several references combine: mean or max of the cosines, or prototype = "
                          "cosine to the re-normalised mean reference embedding (default: %(default)s)")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run: finished images are not redone")
    out.add_argument("--report", type=Path, default=None, metavar="DIR",
                     help="also write an HTML report (ranked contact sheets, sweep comparison) to DIR; "
                          "thumbnails are made while scoring")
    out.add_argument("--report-heatmaps", type=int, default=0, metavar="N",
                     help="with --report: the head's attention over the top and bottom N images of each subject")
    out.add_argument("--group-by", default=None, metavar="LEVEL|COLUMN",
                     help="with --report: compare sweep groups: 'subject', the folder level above each image "
                          "(1 = the folder holding it, 2 = its parent, ...) or a column of the --mapping file "
                          "(e.g. checkpoint)")
    out.add_argument("--strict", action="store_true",
                     help="stop at the first unreadable image instead of writing an error row")

    model = parser.add_argument_group("model")
    model.add_argument("--scorer", action="append", default=[], metavar="[NAME=]SPEC",
                       help="repeatable; the first gives score/calibrated/rank, each further one a score:NAME "
                            "column. SPEC: head (the model of --head/--backbone/--readout; the default), clip-i, "
                            "dino-i, dino-i-s8, dinov2, head:PATH.safetensors, pooled:BACKBONE or mean:BACKBONE")
    model.add_argument("--head", type=Path, default=None, help="NearID head file (.safetensors)")
    model.add_argument("--backbone", default=None,
                       help="registry backbone (default: from the head file; needed without --head)")
    model.add_argument("--backbone-weights", type=Path, default=None, help="backbone weights file")
    model.add_argument("--random-weights", action="store_true",
                       help="random backbone weights (smoke tests; scores are meaningless)")
    model.add_argument("--seed", type=int, default=0, help="seed of random weights (default: %(default)s)")
    model.add_argument("--readout", choices=("head", "pooled", "mean"), default="head",
                       help="embedding readout (default: %(default)s)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    model.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16 (default: %(default)s)")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--batch-size", type=int, default=None,
                       help="images per forward pass (default: 16 on CPU, 64 on CUDA; measured, see the README)")
    speed.add_argument("--workers", type=int, default=None,
                       help="decode/preprocess threads (default: CPU cores, at most 8; 0 = none)")
    speed.add_argument("--prefetch", type=int, default=2, help="batches prepared ahead (default: %(default)s)")
    speed.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    speed.add_argument("--cache", type=Path, default=None,
                       help="embedding cache file (default: $NEARID_EMBEDDING_CACHE or ~/.cache/comfy_nearid/embeddings.sqlite)")
    speed.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    speed.add_argument("--no-progress", action="store_true", help="no progress bar")

    scale = parser.add_argument_group(
        "partitions and Ray (shard inputs, or --engine ray; -o is then a folder: one parquet per partition)")
    scale.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process; ray: Ray Data actors, one model each (default: %(default)s)")
    scale.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="auto (the cluster of `ray start`), ray://host:10001, or host:port "
                            "(default: start a local Ray)")
    scale.add_argument("--concurrency", type=int, default=1, help="Ray actors (default: %(default)s)")
    scale.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per Ray actor (default: %(default)s; 1 on a GPU cluster)")
    scale.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray actor (default: %(default)s)")
    scale.add_argument("--partition-size", type=int, default=None,
                       help="images per partition for folder inputs (default: 1000 with --engine ray); given with "
                            "--engine local, scores a folder into partitions too. A shard is one partition")
    scale.add_argument("--subject-field", default="subject",
                       help="parquet column / webdataset JSON field naming a shard sample's subject "
                            "(default: %(default)s; ignored with --reference)")


def _build_plan(args: argparse.Namespace):
    from ..scoring import plan_from_mapping, plan_from_subject_folders, plan_single_subject

    chosen = [name for name, given in (("--reference", bool(args.reference)), ("--mapping", args.mapping is not None),
                                       ("--references-root", args.references_root is not None)) if given]
    if len(chosen) != 1:
        raise InvalidInputError(
            f"choose exactly one layout: --reference, --mapping or --references-root (got {chosen or 'none'})"
        )
    if args.subject is not None and not args.reference:
        raise InvalidInputError("--subject names the single subject of --reference; the other layouts name subjects themselves")
    if args.mapping is not None:
        if args.generated:
            raise InvalidInputError(
                f"--mapping lists each subject's generated folders; remove the positional GEN_DIR {args.generated}"
            )
        return "mapping", plan_from_mapping(args.mapping)
    if not args.generated:
        raise InvalidInputError("give at least one GEN_DIR (folder of generated images)")
    if args.reference:
        return "single", plan_single_subject(args.reference, args.generated, args.subject)
    return "subject-folders", plan_from_subject_folders(args.references_root, args.generated)


def _launched_world_size() -> int:
    from ..launch import launch_info

    return launch_info().world_size


def _process_shard(device: str):
    """This process's place under ``accelerate launch`` / torchrun (or a single process)."""
    from ..scoring import ProcessShard

    if _launched_world_size() <= 1:
        return ProcessShard(), None
    import torch

    from ..launch import process_state

    # accelerate only forms a CPU process group (gloo) when told the run is on the CPU.
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = process_state(cpu=on_cpu)
    if state.num_processes <= 1:
        raise InvalidInputError(
            f"{_launched_world_size()} processes were launched but accelerate formed no process group; "
            "launch with `accelerate launch --multi_gpu --num_processes N` or torchrun"
        )
    return ProcessShard(state.process_index, state.num_processes, state.wait_for_everyone), state


def _load(args: argparse.Namespace, state: Any):
    from .. import load_model

    if args.head is None and args.backbone is None:
        raise InvalidInputError("give --head (a NearID head file) or --backbone (with --random-weights for tests)")
    device = args.device
    if device == "auto" and state is not None:
        device = state.device  # one accelerator per process
    return load_model(
        head=args.head, backbone=args.backbone, backbone_weights=args.backbone_weights,
        pretrained=not args.random_weights, seed=args.seed, readout=args.readout, device=device, dtype=args.dtype,
    )


def _scorer_passes(args: argparse.Namespace, state: Any) -> list:
    """``--scorer`` items -> :class:`ScorerPass` list (models load when their pass starts)."""
    from ..evaluate.scorers import parse_scorer_spec, scorer_model
    from ..scoring import ScorerPass
    from .evaluate import _named

    passes = []
    for item in args.scorer or ["head"]:
        name, spec = _named(item, "--scorer")
        if spec == "head":
            if args.head is None and args.backbone is None:
                raise InvalidInputError("scorer 'head' needs --head (a NearID head file) or --backbone "
                                        "(with --random-weights for tests); or choose --scorer clip-i, dino-i, ...")
            passes.append(ScorerPass(name or "head", lambda: _load(args, state)))
            continue
        kind, arg = parse_scorer_spec(spec)
        if kind == "feature":
            raise InvalidInputError(f"--scorer {spec}: feature scorers need object masks; they serve `nearid eval` only")
        default_name = f"head:{Path(arg).stem}" if kind == "head" else spec
        device = state.device if (args.device == "auto" and state is not None) else args.device

        def load(spec: str = spec, device: Any = device):
            return scorer_model(spec, device=device, dtype=args.dtype, pretrained=not args.random_weights,
                                seed=args.seed)

        passes.append(ScorerPass(name or default_name, load))
    return passes


def _heatmap_model(scorer: Any, count: int) -> Any:
    """The first scorer's model again (its pass released it) when heat-maps are asked for and
    it has an attention-pooling head; ``None`` otherwise."""
    if count <= 0:
        return None
    model = scorer.load()
    if not callable(getattr(model, "attention_map", None)) or getattr(model, "readout", None) != "head":
        logger.warning("--report-heatmaps: scorer %s has no attention head; the report has no heat-maps", scorer.name)
        return None
    return model


def _print_summary(result: Any) -> None:
    subjects = result.subjects
    width = max([7, *(len(s) for s in subjects)])
    print(f"{'subject':{width}s}  {'images':>6s}  {'errors':>6s}  {'mean':>7s}  {'median':>7s}  {'best':>7s}  best image")
    for name, s in subjects.items():
        fmt = lambda v: f"{v:7.4f}" if v is not None else f"{'-':>7s}"  # noqa: E731
        print(f"{name:{width}s}  {s['num_images']:6d}  {s['num_errors']:6d}  {fmt(s['mean'])}  "
              f"{fmt(s['median'])}  {fmt(s['best'])}  {s['best_path'] or '-'}")
    print(f"{result.num_images} image(s), {result.num_errors} unreadable, {result.num_resumed} taken from the "
          f"previous run; rows: {result.outputs.rows}; summary: {result.outputs.summary}")
    if result.outputs.dreambench is not None:
        print(f"DreamBench++ JSON: {result.outputs.dreambench}")
    for scorer, info in result.scorers.items():
        print(f"\nscore:{scorer} ({info['rows']})")
        print(f"{'subject':{width}s}  {'mean':>7s}  {'median':>7s}  {'best':>7s}  best image")
        for name, s in info["subjects"].items():
            fmt = lambda v: f"{v:7.4f}" if v is not None else f"{'-':>7s}"  # noqa: E731
            print(f"{name:{width}s}  {fmt(s['mean'])}  {fmt(s['median'])}  {fmt(s['best'])}  {s['best_path'] or '-'}")
        if info["dreambench"]:
            print(f"DreamBench++ JSON: {info['dreambench']}")


DEFAULT_PARTITION_SIZE = 1000


def _partitioned(args: argparse.Namespace) -> bool:
    from ..scoring.sources import looks_like_shards

    return (args.engine == "ray" or args.partition_size is not None
            or looks_like_shards([str(g) for g in args.generated]))


def _partitions_and_references(args: argparse.Namespace):
    """``(layout, partitions, subject -> reference files, subject field, path -> label columns)``
    of a partitioned run (labels: a folder plan's mapping file columns, else none)."""
    from ..scoring.sources import (
        SubjectField, looks_like_shards, plan_partitions, read_reference_mapping, reference_subjects_from_root,
        shard_partitions,
    )

    if not looks_like_shards([str(g) for g in args.generated]):
        layout, plan = _build_plan(args)
        references = {s.name: s.references for s in plan.subjects}
        size = DEFAULT_PARTITION_SIZE if args.partition_size is None else args.partition_size
        labels = {str(it.path): dict(it.labels) for it in plan.items} if plan.label_names else {}
        return layout, plan_partitions(plan, size), references, SubjectField(args.subject_field), labels
    chosen = [name for name, given in (("--reference", bool(args.reference)), ("--mapping", args.mapping is not None),
                                       ("--references-root", args.references_root is not None)) if given]
    if len(chosen) != 1:
        raise InvalidInputError(
            f"choose exactly one source of references: --reference, --mapping or --references-root "
            f"(got {chosen or 'none'})")
    if args.reference:
        from ..scoring.plan import expand_references

        refs = [Path(r) for r in args.reference]
        name = args.subject or ((refs[0].stem if refs[0].is_file() else refs[0].name) if len(refs) == 1 else "subject")
        references = {name: expand_references(refs, name)}
        subject = SubjectField(args.subject_field, fixed=name)
    elif args.mapping is not None:
        references = read_reference_mapping(args.mapping)
        subject = SubjectField(args.subject_field)
    else:
        references = reference_subjects_from_root(args.references_root)
        subject = SubjectField(args.subject_field)
    return "shards", shard_partitions([str(g) for g in args.generated]), references, subject, {}


def _run_partitioned(args: argparse.Namespace) -> int:
    from ..embedding_cache import EmbeddingCache, default_cache_path
    from ..scoring.partitions import PartitionOptions, score_partitions

    for flag, given in (("--format", args.format), ("--summary", args.summary),
                        ("--dreambench-json", args.dreambench_json), ("--strict", args.strict),
                        ("--scorer", args.scorer), ("--report", args.report)):
        if given:
            raise InvalidInputError(f"{flag} is not available for partitioned runs (shard inputs or --engine ray); "
                                    f"they write <output>/<partition>.parquet and <output>/_summary.json")
    if args.concurrency < 1 or args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        raise InvalidInputError(f"--concurrency must be >= 1, --gpus-per-worker >= 0 and --cpus-per-worker > 0; got "
                                f"{args.concurrency}, {args.gpus_per_worker}, {args.cpus_per_worker}")
    layout, partitions, references, subject, labels = _partitions_and_references(args)
    from ..scoring import default_batch_size

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    model = _load(args, None)
    if args.batch_size is not None:
        batch_size = args.batch_size
    elif args.engine == "ray":  # the actors' device decides
        batch_size = default_batch_size("cuda" if args.gpus_per_worker > 0 else "cpu")
    else:
        batch_size = default_batch_size(model.device)
    options = PartitionOptions(
        aggregate=args.aggregate, batch_size=batch_size,
        num_workers=(min(8, os.cpu_count() or 1) if args.engine == "local" else 1) if args.workers is None
        else args.workers,
        prefetch_batches=args.prefetch, subject=subject, progress=not args.no_progress,
    )
    cache = None if args.no_cache else EmbeddingCache(args.cache or default_cache_path())
    engine = None
    if args.engine == "ray":
        from ..ray import RayEngine

        spec = {"head": args.head, "backbone": args.backbone, "backbone_weights": args.backbone_weights,
                "pretrained": not args.random_weights, "seed": args.seed, "readout": args.readout,
                "device": "auto" if args.device == "auto" else args.device, "dtype": args.dtype}
        engine = RayEngine(spec, address=args.ray_address, concurrency=args.concurrency,
                           gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker)
    run_config = {
        "layout": layout, "argv": sys.argv[1:], "engine": args.engine, "ray_address": args.ray_address,
        "concurrency": args.concurrency, "gpus_per_worker": args.gpus_per_worker,
        "partition_size": None if layout == "shards" else (args.partition_size or DEFAULT_PARTITION_SIZE),
        "model": {"head": None if args.head is None else str(args.head), "backbone": args.backbone,
                  "random_weights": args.random_weights, "seed": args.seed, "readout": args.readout,
                  "dtype": str(model.dtype)},
    }
    try:
        result = score_partitions(model, partitions, references, args.output, options=options, engine=engine,
                                  cache=cache, resume=args.resume, overwrite=args.overwrite, run_config=run_config,
                                  labels=labels)
    finally:
        if cache is not None:
            cache.close()
    print(f"{result.num_images} image(s), {result.num_errors} unreadable, {result.num_partitions} partition(s), "
          f"{result.num_resumed_partitions} taken from the previous run; rows: {result.output_dir}/*.parquet; "
          f"summary: {result.output_dir}/_summary.json")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..embedding_cache import EmbeddingCache, default_cache_path
    from ..scoring import OutputPaths, RunSettings, ScoringOptions, default_batch_size, score_plan_with_scorers

    if _partitioned(args):
        return _run_partitioned(args)
    from ..score_report import ThumbnailSink, check_group_by, write_score_report

    layout, plan = _build_plan(args)  # every input problem stops here, before any model work
    if args.report is None and (args.group_by is not None or args.report_heatmaps):
        raise InvalidInputError("--group-by and --report-heatmaps shape the HTML report; add --report DIR")
    if args.report_heatmaps < 0:
        raise InvalidInputError(f"--report-heatmaps must be >= 0, got {args.report_heatmaps}")
    check_group_by(args.group_by, plan.label_names)  # before the model loads
    outputs = OutputPaths.for_rows(args.output, args.format, args.summary)
    options = ScoringOptions(
        aggregate=args.aggregate, batch_size=1 if args.batch_size is None else args.batch_size,  # None: set per device below
        num_workers=min(8, os.cpu_count() or 1) if args.workers is None else args.workers,
        prefetch_batches=args.prefetch, strict=args.strict, progress=not args.no_progress,
    )
    # Every output (and the cache) is checked before the model loads and any image is decoded.
    outputs.check_writable(args.resume)
    cache_path = None if args.no_cache else (args.cache or default_cache_path())
    if cache_path is not None:
        from ..fileio import check_writable

        check_writable(Path(cache_path).expanduser(), "embedding cache", existing_ok=True)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    shard, state = _process_shard(args.device)
    options = dataclasses.replace(options, progress=options.progress and shard.is_main)
    scorers = _scorer_passes(args, state)
    if args.batch_size is None:
        from ..model import resolve_device

        device = state.device if (args.device == "auto" and state is not None) else args.device
        options = dataclasses.replace(options, batch_size=default_batch_size(resolve_device(device)))
    cache = None if cache_path is None else EmbeddingCache(cache_path)
    run_config = {
        "layout": layout,
        "argv": sys.argv[1:],
        "model": {"head": None if args.head is None else str(args.head), "backbone": args.backbone,
                  "random_weights": args.random_weights, "seed": args.seed, "readout": args.readout,
                  "device": args.device, "dtype": args.dtype},
        "cache": None if cache is None else str(cache.path),
        "strict": args.strict,
        "num_processes": shard.count,
    }
    thumbnails = ThumbnailSink(args.report) if args.report is not None else None
    try:
        settings = RunSettings(options=options, cache=cache, resume=args.resume, overwrite=args.overwrite,
                               shard=shard, run_config=run_config, on_decoded=thumbnails)
        result = score_plan_with_scorers(scorers, plan, outputs, settings, dreambench_template=args.dreambench_json)
    finally:
        if cache is not None:
            cache.close()
    if result is not None:
        _print_summary(result)
        if args.report is not None:
            index = write_score_report(outputs.rows, args.report, group_by=args.group_by,
                                       heatmap_model=_heatmap_model(scorers[0], args.report_heatmaps),
                                       heatmaps=args.report_heatmaps)
            print(f"report: {index}")
    return 0
