"""Copy the published DreamBench++ rating files into the package, gzip-compressed.

    python scripts/bundle_dreambench_ratings.py SOURCE

SOURCE is a ``dreambench_plus`` folder as published (``README.md`` plus ``ratings/`` with
``data_human_rating/merged_data/group{1,2}/<method>-cp.json`` and one ``<metric>/<method>.json``
per metric). Every ``*.json`` becomes ``*.json.gz`` under ``comfy_nearid/data/dreambench_plus/``
(byte-identical content once decompressed; a fixed gzip header, so a re-run gives the same
bytes), the README is copied, and ``SHA256SUMS`` lists each original file's SHA-256 so that
the bundle can be checked against a fresh copy of the published files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import sys
from pathlib import Path

DEST = Path(__file__).resolve().parent.parent / "comfy_nearid" / "data" / "dreambench_plus"


def bundle(source: Path, dest: Path = DEST) -> int:
    ratings = source / "ratings"
    if not (ratings / "data_human_rating").is_dir():
        raise SystemExit(f"{source} holds no ratings/data_human_rating: not a published dreambench_plus folder")
    if (dest / "ratings").exists():
        shutil.rmtree(dest / "ratings")
    sums = []
    files = sorted(ratings.rglob("*.json"))
    for path in files:
        rel = path.relative_to(source)
        data = path.read_bytes()
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {rel.as_posix()}")
        target = dest / rel.with_name(rel.name + ".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0 and no file name in the header: the same input always gives the same bytes
        with open(target, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(data)
    shutil.copyfile(source / "README.md", dest / "README.md")
    (dest / "SHA256SUMS").write_text("\n".join(sums) + "\n", encoding="utf-8")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the published dreambench_plus folder (README.md + ratings/)")
    args = parser.parse_args(argv)
    count = bundle(args.source)
    print(f"bundled {count} rating files into {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
