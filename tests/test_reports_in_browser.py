"""Every HTML page the product writes (score report, eval report, demo report) loads from
disk in headless Chromium with no console error and no broken image; a screenshot of each is
written next to the report (``screenshot.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _browser import open_page, require_browser
from _eval_helpers import write_tiny_dataset
from _scoring_helpers import TINY_MODEL_ARGS, write_broken_files, write_image
from comfy_nearid.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _assert_clean(index: Path) -> None:
    check = open_page(index, index.parent / "screenshot.png")
    assert check.images, f"{index}: no images on the page"
    assert check.broken_images == [], f"{index}: broken images {check.broken_images}"
    assert check.console_errors == [] and check.page_errors == [], (check.console_errors, check.page_errors)
    assert check.failed_requests == [], check.failed_requests
    assert (index.parent / "screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_report_opens_in_chromium(tmp_path):
    require_browser()
    rng = np.random.default_rng(0)
    for i in range(2):
        write_image(tmp_path / "ref" / f"r{i}.png", rng, size=(64, 48))
    for ck in ("ckpt-100", "ckpt-200"):
        for i in range(6):
            write_image(tmp_path / "gen" / ck / f"{i}.png", rng, size=(96, 96))
    write_broken_files(tmp_path / "gen" / "ckpt-200", rng)
    report = tmp_path / "report"
    assert main(["score", "--reference", str(tmp_path / "ref"), str(tmp_path / "gen"), "-o", str(tmp_path / "s.csv"),
                 "--report", str(report), "--group-by", "1", "--report-heatmaps", "1", "--no-cache",
                 *TINY_MODEL_ARGS]) == 0
    _assert_clean(report / "index.html")
    for page in sorted(report.glob("subject-*.html")):
        check = open_page(page, page.with_suffix(".png"))
        assert check.broken_images == [] and check.console_errors == [] and check.page_errors == []
        assert any("thumbs/" in i["src"] for i in check.images) and any("heatmaps/" in i["src"] for i in check.images)


def test_eval_report_opens_in_chromium(tmp_path):
    require_browser()
    data = write_tiny_dataset(tmp_path / "ds", n_samples=4, seed=5)
    report = tmp_path / "report"
    assert main(["eval", "ssr", "--data", str(data), "--scorer", "mean:tiny-siglip", "--random-weights",
                 "--device", "cpu", "--bootstrap", "20", "--no-progress", "--out", str(tmp_path / "out"),
                 "--report", str(report)]) == 0
    _assert_clean(report / "index.html")


def test_demo_report_opens_in_chromium(tmp_path):
    require_browser()
    import torch

    from trainer.demo import run_demo
    from test_demo import TINY

    torch.set_num_threads(1)
    result = run_demo(tmp_path / "demo", **TINY)
    _assert_clean(result.report_path)


def test_the_check_catches_a_broken_image_and_a_console_error(tmp_path):
    require_browser()
    write_image(tmp_path / "ok.png", np.random.default_rng(0))
    page = tmp_path / "index.html"
    page.write_text('<!doctype html><html><body><img src="ok.png"><img src="missing.png">'
                    '<img src="ok.png" loading="lazy" style="margin-top:5000px">'
                    '<script>console.error("boom")</script></body></html>')
    check = open_page(page, tmp_path / "shot.png")
    assert check.broken_images == ["missing.png"]
    assert [i["naturalWidth"] for i in check.images if i["src"] == "ok.png"] == [36, 36]  # the lazy one loaded too
    assert check.console_errors and "boom" in " ".join(check.console_errors)
