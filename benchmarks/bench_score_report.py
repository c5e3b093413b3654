"""Benchmark of `nearid score --report`: peak memory and the page in a headless browser.

1. Peak memory (max RSS of a fresh process) of `nearid score` on N images (default 10,000)
   with `--report DIR --group-by 1` vs the same run without `--report`, side by side.
   Target: within 10% (ratio printed).
2. The report's index page and the first subject page opened from disk in headless Chromium
   (Debian's package via Playwright): seconds to the load event, printed, not asserted.

Usage: python benchmarks/bench_score_report.py [--images 10000] [--side 48]
tiny-siglip with random weights (nothing is downloaded); timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import peak_rss_mib, write_images  # noqa: E402


def score_args(ref: Path, gen: Path, out: Path, report: Path | None) -> list[str]:
    args = ["score", "--reference", str(ref), str(gen), "-o", str(out), "--overwrite", "--no-cache", "--no-progress",
            "--backbone", "tiny-siglip", "--random-weights", "--device", "cpu", "--dtype", "fp32", "--batch-size", "64"]
    return args + (["--report", str(report), "--group-by", "1"] if report is not None else [])


def page_open_seconds(page: Path) -> float | None:
    """Seconds from navigation to the load event of ``page`` in headless Chromium, or None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("  (no playwright: pip install playwright)")
        return None
    if chromium is None:
        print("  (no chromium on PATH: apt-get install chromium)")
        return None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            tab.goto(page.resolve().as_uri(), wait_until="load")
            return time.perf_counter() - start
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=48, help="generated image side in pixels")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nearid-bench-report-"))
    ref = write_images(work / "ref", 1, args.side, seed=1)[0]
    per_folder = -(-args.images // 4)  # four "checkpoints" of a sweep
    for k in range(4):
        write_images(work / "gen" / f"ckpt-{k}", min(per_folder, args.images - k * per_folder), args.side, seed=10 + k)
    print(f"{args.images} JPEGs of {args.side}px in 4 folders, tiny-siglip (random weights)")
    plain = peak_rss_mib(score_args(ref, work / "gen", work / "plain.csv", None), work)
    start = time.perf_counter()
    report_dir = work / "report"
    with_report = peak_rss_mib(score_args(ref, work / "gen", work / "report.csv", report_dir), work)
    seconds = time.perf_counter() - start
    print(f"peak RSS without --report: {plain:.0f} MiB; with --report: {with_report:.0f} MiB; "
          f"ratio {with_report / plain:.3f} (target <= 1.10); run with report {seconds:.0f} s")
    thumbs = list((report_dir / "thumbs").iterdir())
    pages = sorted(report_dir.glob("subject-*.html"))
    print(f"report: {len(thumbs)} thumbnails, {sum(p.stat().st_size for p in thumbs) / 2**20:.1f} MiB; "
          f"{len(pages)} subject page(s), largest {max(p.stat().st_size for p in pages) / 1024:.0f} KiB")
    for page in (report_dir / "index.html", pages[0]):
        t = page_open_seconds(page)
        if t is not None:
            print(f"headless Chromium: {page.name} loads in {t:.2f} s")


if __name__ == "__main__":
    main()
