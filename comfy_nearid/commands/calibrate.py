"""`nearid calibrate`: fit a head's 0..100 identity-match curve and check it.

The curve (:mod:`comfy_nearid.calibration`) is fitted on same-identity view pairs against
near-identity pairs (a view and its own distractor), either embedded with the head from a
dataset (``--data ROOT --split S``, or the published NearID tables with ``--positives``), or
read from a per-sample similarity CSV the head produced (``--csv``, e.g. from ``nearid eval
ssr``). With ``--eval-split`` / ``--eval-csv`` the reliability report is computed on those
held-out pairs; without, on the fitting pairs (said so in the output).

Writes the curve, with its provenance, into the head file atomically (or into ``--out``,
leaving the input alone), and the report (``reliability.json``, ``reliability.png``) into
``--report`` (default: ``<head>.calibration/`` beside the written head). ``nearid convert``
takes the same data options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head", required=True, type=Path, help="the head file (.safetensors) to calibrate")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the calibrated head here instead of into --head (atomic either way)")
    add_data_arguments(parser)


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The pair options shared by ``nearid calibrate`` and ``nearid convert``."""
    data = parser.add_argument_group(
        "calibration pairs" + ("" if required else " (optional: calibrate the converted head in the same command)"))
    data.add_argument("--data", type=Path, default=None, help="folder-layout NearID dataset root")
    data.add_argument("--positives", type=Path, default=None,
                      help="published NearID positives (local dataset path) instead of --data")
    data.add_argument("--distractors", action="append", default=[], metavar="NAME=PATH",
                      help="published distractor set, repeatable (with --positives)")
    data.add_argument("--split", default=None, help="split to fit on (folder under --data, or split of --positives)")
    data.add_argument("--eval-split", default=None, help="held-out split to report on (default: the fitting pairs)")
    data.add_argument("--indices", type=Path, default=None, help="JSON split file of row numbers (fitting data)")
    data.add_argument("--sources", default=None, help="comma-separated distractor sources (default: all)")
    data.add_argument("--limit", type=int, default=None, help="use only the first N samples of each split")
    data.add_argument("--csv", type=Path, default=None, metavar="SIMS",
                      help="fit on a per-sample similarity CSV made with this head (instead of a dataset)")
    data.add_argument("--eval-csv", type=Path, default=None, metavar="SIMS",
                      help="held-out similarity CSV to report on (with --csv)")
    data.add_argument("--masks", action="store_true", help="give the head the object masks")
    data.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--backbone-weights", type=Path, default=None, metavar="PATH",
                      help="the backbone's weights file or folder (default: the usual places on disk)")
    data.add_argument("--random-weights", action="store_true",
                      help="build the backbone with random weights (smoke tests; the curve means nothing)")
    data.add_argument("--report", type=Path, default=None,
                      help="folder for reliability.json and reliability.png (default: <head>.calibration/)")
    data.add_argument("--no-progress", action="store_true", help="hide progress bars")


def has_data_options(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in ("data", "positives", "csv"))


def _check_options(args: argparse.Namespace) -> None:
    given = [f"--{k}" for k in ("data", "positives", "csv") if getattr(args, k) is not None]
    if len(given) != 1:
        raise InvalidInputError(
            "give the calibration pairs with exactly one of --data ROOT --split S, --positives PATH "
            f"--distractors NAME=PATH, or --csv SIMS; got {given or 'none'}")
    if args.csv is not None and (args.split or args.eval_split):
        raise InvalidInputError("--split/--eval-split go with --data or --positives; with --csv use --eval-csv")
    if args.eval_csv is not None and args.csv is None:
        raise InvalidInputError("--eval-csv goes with --csv")
    if args.eval_split is not None and args.eval_split == args.split:
        raise InvalidInputError(f"--eval-split {args.eval_split!r} is the fitting split; a held-out split must differ")
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {args.batch_size}")


def _dataset_pairs(args: argparse.Namespace, model: Any, split: str | None, indices: Path | None):
    from ..calibration import pairs_from_dataset
    from .evaluate import _open_dataset

    ns = argparse.Namespace(benchmark="ssr", data=args.data, positives=args.positives, distractors=args.distractors,
                            split=split, indices=indices, limit=args.limit)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    return pairs_from_dataset(model, _open_dataset(ns), sources=sources, use_masks=args.masks,
                              batch_size=args.batch_size, progress=not args.no_progress)


def calibrate_from_args(args: argparse.Namespace, head: Path, out: Path | None) -> dict[str, Any]:
    """Fit the curve for ``head`` on the pairs the options name, write it into ``out`` (default:
    ``head``) and the report beside it; returns the JSON-ready result."""
    from ..calibration import fit_calibration, pairs_from_table, reliability_diagram, write_head_calibration
    from ..metrics.table import read_similarity_csv

    _check_options(args)
    if args.csv is not None:
        fit_pairs = pairs_from_table(read_similarity_csv(args.csv))
        heldout = pairs_from_table(read_similarity_csv(args.eval_csv)) if args.eval_csv is not None else None
        data, split, heldout_split = str(args.csv), None, (str(args.eval_csv) if args.eval_csv else None)
    else:
        from .. import load_model

        model = load_model(head=head, device=args.device, pretrained=not args.random_weights,
                           backbone_weights=args.backbone_weights)
        fit_pairs = _dataset_pairs(args, model, args.split, args.indices)
        heldout = _dataset_pairs(args, model, args.eval_split, None) if args.eval_split is not None else None
        data = str(args.data if args.data is not None else args.positives)
        split, heldout_split = args.split, args.eval_split
    fit = fit_calibration(*fit_pairs, data=data, split=split, heldout=heldout, heldout_split=heldout_split,
                          extra={"sources": args.sources, "masks": bool(args.masks)})
    written = write_head_calibration(head, fit.calibration, out)
    report_dir = args.report or written.with_name(written.stem + ".calibration")
    report = fit.report
    where = f"held-out {heldout_split}" if fit.heldout_report is not None else "the fitting pairs (no held-out set given)"
    diagram = reliability_diagram(report, report_dir / "reliability.png", title=f"{written.name} on {where}")
    result = {
        "head": str(written), "curve": fit.calibration.to_dict(), "reported_on": where,
        "report": report.to_dict(), "fit_report": fit.fit_report.to_dict(), "diagram": str(diagram),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "reliability.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    c = fit.calibration
    print(f"fitted on {c.source}: {c.n_same} same-identity / {c.n_near} near-identity pairs; "
          f"match 50 at cosine {c.midpoint:.4f}, slope {c.slope:.2f}")
    print(f"reliability on {where}: {report.summary_line()}")
    print(f"calibrated head: {written}")
    print(f"report: {report_dir / 'reliability.json'}, diagram: {diagram}")
    return result


def run(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.resolve() != args.head.resolve() and args.out.exists():
        raise InvalidInputError(f"--out {args.out} exists; remove it or calibrate it in place with --head")
    calibrate_from_args(args, args.head, args.out)
    return 0
