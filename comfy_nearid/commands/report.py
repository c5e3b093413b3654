"""`nearid report ROWS_FILE --out DIR`: the HTML report of an existing `nearid score` rows file.

The same page as ``nearid score --report DIR``; thumbnails missing from ``DIR/thumbs`` are made
here (one image at a time), the calibration and references come from ``<rows>.config.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rows", type=Path, metavar="ROWS_FILE", help="rows file (.csv or .jsonl) written by `nearid score`")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder (index.html goes here)")
    parser.add_argument("--group-by", default=None, metavar="LEVEL|COLUMN",
                        help="compare sweep groups: 'subject', the folder level above each image "
                             "(1 = the folder holding it, 2 = its parent, ...) or a column of the --mapping file "
                             "(e.g. checkpoint)")
    parser.add_argument("--page-size", type=int, default=None, help="candidates per subject page (default: 200)")


def run(args: argparse.Namespace) -> int:
    from ..score_report import PAGE_SIZE, write_score_report

    index = write_score_report(args.rows, args.out, group_by=args.group_by, page_size=args.page_size or PAGE_SIZE)
    print(f"report: {index}")
    return 0
