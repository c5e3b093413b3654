"""`nearid eval ssr|mtg|human`: evaluate scorers with the paper's protocol.

- ``ssr``: NearID SSR / PA (and the reference PA) from models (``--scorer``) on a NearID
  dataset, and/or from per-sample similarity CSVs (``--csv``); one Table-1-style row each.
- ``mtg``: the same on MTG-format data, plus MO / MOpair from the part/object masks.
- ``human``: DreamBench++ human alignment (MH) of score directories, against the published
  DreamBench++ ratings bundled with the package unless ``--ratings`` names others.

Outputs under ``--out`` (default ``nearid_eval``): ``<scorer>.samples.csv`` (similarities,
margins), ``summary.json``, ``table.md`` and ``eval_config.json`` (the resolved options);
``--json PATH`` writes the summary there too, ``--report DIR`` an HTML report.
``--cache [PATH]`` makes model scorers read and fill the shared embedding cache.
Run on several processes with ``accelerate launch -m comfy_nearid eval ssr ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..masking import MASK_KEEPS, MASK_MODES

logger = logging.getLogger(__name__)

DEFAULT_OUT = "nearid_eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in (
        ("ssr", "NearID protocol: SSR / PA of scorers on a NearID dataset or similarity CSVs"),
        ("mtg", "MTG part-level benchmark: SSR / PA, MO and MOpair"),
    ):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        _add_scoring_arguments(sp, mtg=name == "mtg")
    hp = sub.add_parser("human", help="DreamBench++ human alignment (MH) of score directories",
                        description="DreamBench++ human alignment: Fisher-z mean over methods of "
                                    "(r_group1 + r_group2) / 2 per category.")
    hp.add_argument("--ratings", type=Path, default=None,
                    help="DreamBench++ ratings directory (holds data_human_rating/merged_data/group1|group2); "
                         "default: the published DreamBench++ ratings bundled with comfy-nearid")
    hp.add_argument("--metric", action="append", default=None,
                    help="metric directory (one <method>.json per method, e.g. written by `nearid score "
                         "--dreambench-json`): under --ratings, relative to the working directory, or absolute; "
                         "repeatable; 'human' = the group1-vs-group2 ceiling; default: every directory under "
                         "--ratings with one file per method")
    hp.add_argument("--category", action="append", default=None,
                    help="category NAME, NAME=REGEX or REGEX (matched at the key's start), repeatable; "
                         "default: object")
    hp.add_argument("--per-method", action="store_true", help="also print each method's r")
    hp.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output directory (default: %(default)s)")
    hp.add_argument("--json", type=Path, default=None, help="also write the JSON result to this path")


def _add_scoring_arguments(sp: argparse.ArgumentParser, mtg: bool) -> None:
    data = sp.add_argument_group("data (a dataset for --scorer; not needed for --csv)")
    data.add_argument("--data", type=Path, default=None,
                      help="folder-layout dataset root (MTG folder layout for mtg)")
    data.add_argument("--split", default=None, help="split folder under --data (e.g. test)")
    if mtg:
        data.add_argument("--published", type=Path, default=None,
                          help="published MTG table (save_to_disk folder or parquet shards) instead of --data")
    else:
        data.add_argument("--positives", type=Path, default=None,
                          help="published NearID positives (local dataset path) instead of --data")
        data.add_argument("--distractors", action="append", default=[], metavar="NAME=PATH",
                          help="published distractor set, repeatable (with --positives)")
        data.add_argument("--sources", default=None,
                          help="comma-separated distractor sources to evaluate (default: all)")
    data.add_argument("--indices", type=Path, default=None, help="JSON split file of row numbers")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    sc = sp.add_argument_group("scorers (repeatable, one table row each)")
    sc.add_argument("--scorer", action="append", default=[], metavar="SPEC",
                    help="clip-i | dino-i | dino-i-s8 | dinov2 | head:PATH.safetensors | pooled:BACKBONE | mean:BACKBONE | "
                         "feature:background|object; "
                         "optionally NAME=SPEC")
    sc.add_argument("--csv", action="append", default=[], metavar="[NAME=]FILE",
                    help="per-sample similarity CSV in the reference format")
    sc.add_argument("--masks", nargs="?", const="attention", default=None, choices=MASK_MODES,
                    help="use the object masks in model scorers: 'attention' (bare --masks; the head "
                         "attends only to the mask's patches) or 'pixels' (the reference evaluation: the "
                         "cleaned mask blackens the image's pixels; see docs/evaluation.md). Default: off")
    sc.add_argument("--mask-keep", choices=MASK_KEEPS, default="foreground",
                    help="with --masks pixels: keep the 'foreground' (outside -> black) or the "
                         "'background' (inside -> black, a context-only probe) (default: %(default)s)")
    sc.add_argument("--random-weights", action="store_true",
                    help="build backbones with random weights (smoke tests; scores are meaningless)")
    sc.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    sc.add_argument("--batch-size", type=int, default=32)
    sc.add_argument("--cache", nargs="?", const="", default=None, metavar="PATH",
                    help="read and fill the embedding cache of model scorers: PATH, or with no value "
                         "$NEARID_EMBEDDING_CACHE / ~/.cache/comfy_nearid/embeddings.sqlite (default: off)")
    st = sp.add_argument_group("statistics and outputs")
    st.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0 = none)")
    st.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    st.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output directory (default: %(default)s)")
    st.add_argument("--json", type=Path, default=None, help="also write the summary JSON to this path")
    st.add_argument("--report", type=Path, default=None, help="write an HTML report into this directory")
    st.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "human":
        return _run_human(args)
    return _run_scoring(args)


# --------------------------------------------------------------------------- human


def _check_outputs_writable(args: argparse.Namespace) -> None:
    """Every output of ``eval`` (and the cache), checked before any work."""
    from ..fileio import check_writable

    check_writable(args.out / "summary.json", "output folder", existing_ok=False)
    if args.json is not None:
        check_writable(args.json, "--json output", existing_ok=False)
    if getattr(args, "report", None) is not None:
        check_writable(args.report / "index.html", "--report folder", existing_ok=False)
    cache = getattr(args, "cache", None)
    if cache is not None:
        from ..embedding_cache import default_cache_path

        check_writable(Path(cache).expanduser() if cache else default_cache_path(), "embedding cache")


def _run_human(args: argparse.Namespace) -> int:
    from ..metrics.human import alignment_to_dict, human_alignment, parse_categories

    categories = parse_categories(args.category)
    _check_outputs_writable(args)
    result = alignment_to_dict(human_alignment(args.ratings, args.metric, categories))
    print(format_human_table(result, per_method=args.per_method), end="")
    ratings = str(args.ratings) if args.ratings is not None else "bundled (published DreamBench++ ratings)"
    config = {"command": "eval human", "ratings": ratings, "metrics": list(result),
              "categories": categories}
    paths = [args.out / "human_alignment.json"] + ([args.json] if args.json else [])
    for path in paths:
        _write_json(path, result)
    _write_json(args.out / "eval_config.json", config)
    (args.out / "human_alignment.md").write_text(format_human_table(result), encoding="utf-8")
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


def format_human_table(result: dict[str, dict[str, dict]], per_method: bool = False) -> str:
    """Markdown table: one row per metric, one MH column per category (3 decimals)."""
    categories = list(dict.fromkeys(c for per_cat in result.values() for c in per_cat))
    lines = ["| metric | " + " | ".join(f"{c} MH" for c in categories) + " |",
             "|" + "---|" * (len(categories) + 1)]
    for metric, per_cat in result.items():
        cells = [_fmt3(per_cat.get(c, {}).get("mh")) for c in categories]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    if per_method:
        for metric, per_cat in result.items():
            for category, res in per_cat.items():
                lines.append("")
                lines.append(f"{metric} / {category}: " + ", ".join(
                    f"{m} {_fmt3(v['r'])}" for m, v in res["per_method"].items()))
    return "\n".join(lines) + "\n"


def _fmt3(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------- ssr / mtg


def _named(value: str, what: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); a bare VALUE -> (None, VALUE). Scorer specs keep their ':'."""
    name, sep, rest = value.partition("=")
    if sep and re.fullmatch(r"[\w.\- ]+", name) and rest:
        return name, rest
    if sep and not rest:
        raise InvalidInputError(f"{what} {value!r}: empty value after '='")
    return None, value


def _open_dataset(args: argparse.Namespace) -> list:
    """The samples to evaluate (``--limit`` first ones) from the reader the options name."""
    from ..data.folder import FolderDataset
    from ..data.mtg import MTGFolderDataset, PublishedMTGDataset

    if args.benchmark == "mtg":
        if args.published is not None:
            dataset = PublishedMTGDataset(args.published, indices=args.indices, split=args.split)
        else:
            dataset = MTGFolderDataset(args.data, split=args.split, indices=args.indices)
    elif args.positives is not None:
        from ..data.published import PublishedNearIDDataset

        distractors = {}
        for item in args.distractors:
            name, path = _named(item, "--distractors")
            if name is None:
                raise InvalidInputError(f"--distractors {item!r}: expected NAME=PATH")
            distractors[name] = Path(path)
        dataset = PublishedNearIDDataset(args.positives, distractors, indices=args.indices, split=args.split)
    else:
        dataset = FolderDataset(args.data, split=args.split, indices=args.indices)
    if args.limit is not None and args.limit < 1:
        raise InvalidInputError(f"--limit must be >= 1, got {args.limit}")
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    return [dataset[i] for i in range(count)]


def _has_data(args: argparse.Namespace) -> bool:
    if args.benchmark == "mtg":
        return args.data is not None or args.published is not None
    return args.data is not None or args.positives is not None


def _default_device(device: str | None) -> str | None:
    """Under a multi-process launch each process takes its own GPU (``LOCAL_RANK``)."""
    if device is not None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _open_cache(option: str | None) -> Any:
    """The embedding cache ``--cache`` names: ``None`` when absent, the default file when given
    without a value. Off by default: an evaluation is usually a one-off measurement, and a
    cache that silently grows in the home folder should be asked for."""
    if option is None:
        return None
    from ..embedding_cache import EmbeddingCache, default_cache_path

    path = Path(option) if option else default_cache_path()
    logger.info("embedding cache: %s", path)
    return EmbeddingCache(path)


def _run_scoring(args: argparse.Namespace) -> int:
    from .. import evaluate as ev

    if not args.scorer and not args.csv:
        raise InvalidInputError(f"nearid eval {args.benchmark}: give at least one --scorer SPEC or --csv FILE")
    if args.scorer and not _has_data(args):
        raise InvalidInputError("--scorer needs a dataset: --data DIR"
                                + (" or --published PATH" if args.benchmark == "mtg" else " or --positives PATH"))
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.mask_keep != "foreground" and args.masks != "pixels":
        raise InvalidInputError(f"--mask-keep {args.mask_keep} applies to --masks pixels (got {'--masks ' + args.masks if args.masks else 'no --masks'})")
    if int(os.environ.get("RANK", "0")) == 0:
        _check_outputs_writable(args)
    rank = int(os.environ.get("RANK", "0"))
    progress = not args.no_progress
    results: list = []
    dataset_samples = None
    if args.scorer:
        dataset_samples = _open_dataset(args)
        sources = getattr(args, "sources", None)
        sources = [s.strip() for s in sources.split(",") if s.strip()] if sources else None
        device = _default_device(args.device)
        cache = _open_cache(args.cache)
        try:
            for item in args.scorer:
                name, spec = _named(item, "--scorer")
                scorer = ev.model_scorer(spec, name=name, device=device, batch_size=args.batch_size,
                                         use_masks=args.masks is not None, mask_mode=args.masks or "attention",
                                         mask_keep=args.mask_keep, pretrained=not args.random_weights, cache=cache)
                results += ev.evaluate_dataset([scorer], dataset_samples, benchmark=args.benchmark,
                                               sources=sources, n_resamples=args.bootstrap, seed=args.seed,
                                               progress=progress)
        finally:
            if cache is not None:
                cache.close()
    for item in args.csv:
        name, path = _named(item, "--csv")
        results.append(ev.csv_result(name or Path(path).stem, path, benchmark=args.benchmark,
                                     n_resamples=args.bootstrap, seed=args.seed))
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"scorer names must be unique (name them NAME=SPEC / NAME=FILE), got {names}")
    if rank != 0:  # only the main process writes and prints
        return 0
    _write_outputs(args, results, dataset_samples)
    return 0


def _write_outputs(args: argparse.Namespace, results: list, samples: list | None) -> None:
    from .. import evaluate as ev
    from ..metrics.table import write_similarity_csv

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = {r.name: r.summary for r in results}
    table_md = ev.format_table(results)
    breakdown_md = ev.format_breakdown(results, by="source")
    for r in results:
        write_similarity_csv(out / f"{_safe(r.name)}.samples.csv", r.table)
    for path in [out / "summary.json"] + ([args.json] if args.json else []):
        _write_json(path, summary)
    (out / "table.md").write_text(table_md + "\n" + breakdown_md, encoding="utf-8")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config["command"] = f"eval {args.benchmark}"
    config["scorers"] = {r.name: r.config for r in results}
    _write_json(out / "eval_config.json", config)
    if args.report is not None:
        from ..report import write_report

        write_report(args.report, results, samples)
    print(table_md)
    print(breakdown_md, end="")
    logger.info("wrote per-sample CSVs, summary.json and table.md to %s", out)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("_") or "scorer"


def _write_json(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
