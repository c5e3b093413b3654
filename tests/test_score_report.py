"""The score report: numbers on the page equal the rows file, thumbnails come from the scoring
pass, the calibrated cut, paging, sweep statistics, bad options."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _scoring_helpers import TINY_MODEL_ARGS, write_broken_files, write_image
from comfy_nearid.cli import EXIT_BAD_INPUT, main
from comfy_nearid.score_report import (
    bootstrap_interval,
    group_of,
    sweep_table,
    thumbnail_name,
    write_score_report,
)
from comfy_nearid.scoring import read_rows


class _PageParser(HTMLParser):
    """Cards (their data-* attributes and the text of their .score/.rank/.match spans), cut
    lines, the rows of every table by id, and img sources."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.sequence: list[str] = []  # "card" / "cut" in page order
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._span: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "div" and "card" in cls:
            self.cards.append({k[5:]: v for k, v in a.items() if k.startswith("data-")})
            self.sequence.append("card")
        elif tag == "div" and "cut" in cls:
            self.sequence.append("cut")
        elif tag == "span" and cls and cls[0] in ("score", "rank", "match"):
            self._span = cls[0]
        elif tag == "img":
            self.images.append(a["src"])
            if self.cards and self._span is None and "thumbs/" in a["src"]:
                self.cards[-1]["img"] = a["src"]
        elif tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._table and not self.tables[self._table][-1]:
            self.tables[self._table].pop()  # a header row (th only)
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._span:
            self.cards[-1]["text_" + self._span] = data
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> _PageParser:
    p = _PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _pages(report: Path) -> list[Path]:
    return sorted(report.glob("subject-*.html"))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A two-checkpoint sweep of one subject with broken files, scored with --report."""
    root = tmp_path_factory.mktemp("score_report")
    rng = np.random.default_rng(3)
    for i in range(2):
        write_image(root / "ref" / f"r{i}.png", rng, size=(50, 40))
    for ck in ("ckpt-100", "ckpt-200"):
        for i in range(9):
            write_image(root / "gen" / ck / f"{i}.png", rng, size=(300, 200))
    reasons = write_broken_files(root / "gen" / "ckpt-100", rng)
    rows, report = root / "out" / "scores.csv", root / "report"
    rc = main(["score", "--reference", str(root / "ref"), str(root / "gen"), "-o", str(rows), "--report", str(report),
               "--group-by", "1", "--no-cache", *TINY_MODEL_ARGS])
    assert rc == 0
    return root, rows, report, reasons


def test_numbers_on_the_page_equal_the_rows_file(scored):
    _, rows_file, report, reasons = scored
    rows = read_rows(rows_file)
    scored_rows = {r.path: r for r in rows if r.score is not None}
    cards = [c for page in _pages(report) for c in parse(page).cards]
    assert sorted(c["path"] for c in cards) == sorted(scored_rows)
    for c in cards:
        row = scored_rows[c["path"]]
        assert float(c["score"]) == row.score and float(c["calibrated"]) == row.match
        assert int(c["rank"]) == row.rank == int(c["text_rank"])
        assert c["text_score"] == f"{row.score:.4f}" and c["text_match"] == f"{row.match:.1f}"
    # the sheet is ranked best first
    assert [int(c["rank"]) for c in cards] == list(range(1, len(cards) + 1))
    # error rows: every unreadable file with its reason
    page = parse(_pages(report)[0])
    listed = {Path(p).name: reason for p, reason in page.tables["errors"]}
    assert listed == {Path(r.path).name: r.error for r in rows if r.error}
    for name, words in reasons.items():
        assert words in listed[name]
    # index: the subject's numbers, computed here from the rows file
    scores = np.array([r.score for r in scored_rows.values()])
    (subject_row,) = parse(report / "index.html").tables["subjects"]
    assert subject_row[1:7] == [str(scores.size), str(len(reasons)), f"{scores.mean():.4f}",
                                f"{np.median(scores):.4f}", f"{scores.max():.4f}", f"{(scores >= 0.5).mean():.3f}"]


def test_thumbnails_come_from_the_scoring_pass_and_are_bounded(scored, tmp_path):
    root, rows_file, report, _ = scored
    cards = [c for page in _pages(report) for c in parse(page).cards]
    assert all(c["img"] == f"thumbs/{thumbnail_name(c['path'])}" for c in cards)
    for c in cards:
        with Image.open(report / c["img"]) as im:
            assert max(im.size) <= 128 and im.format == "JPEG"
    # a second report from the same thumbnails needs no generated image at all
    moved = tmp_path / "gone"
    (root / "gen").rename(moved)
    try:
        again = tmp_path / "again"
        (again / "thumbs").mkdir(parents=True)
        for f in (report / "thumbs").iterdir():
            (again / "thumbs" / f.name).write_bytes(f.read_bytes())
        write_score_report(rows_file, again)
        assert [c.get("img") for p in _pages(again) for c in parse(p).cards] == [c["img"] for c in cards]
    finally:
        moved.rename(root / "gen")


def test_sweep_table_on_the_page_matches_the_rows(scored):
    _, rows_file, report, _ = scored
    rows = [r for r in read_rows(rows_file) if r.score is not None]
    table = parse(report / "index.html").tables["sweep"]
    assert {r[1] for r in table} == {"ckpt-100", "ckpt-200"}
    for rank, group, n, mean, median, share, _ in table:
        s = np.array([r.score for r in rows if Path(r.path).parent.name == group])
        assert n == str(s.size)
        assert mean.startswith(f"{s.mean():.4f} [") and median.startswith(f"{np.median(s):.4f} [")
        assert share.startswith(f"{(s >= 0.5).mean():.3f} [")
    means = [float(r[3].split()[0]) for r in table]
    assert means == sorted(means, reverse=True)
    assert (report / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_rows(folder: Path, scores: list[float], calibration: dict | None) -> Path:
    rows = folder / "s.jsonl"
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    rank = {i: r for r, i in enumerate(order, start=1)}
    with open(rows, "w") as f:
        for i, s in enumerate(scores):
            f.write(json.dumps({"path": f"g/{i}.png", "subject": "s", "cosines": [s], "score": s,
                                "match": 50.0, "calibrated": False, "rank": rank[i], "error": None}) + "\n")
    config = {"calibration": calibration} if calibration else {}
    (folder / "s.config.json").write_text(json.dumps(config))
    return rows


@pytest.mark.parametrize("page_size", [2, 3, 50])
def test_the_cut_sits_between_the_last_score_above_and_the_first_below(tmp_path, page_size):
    scores = [0.9, 0.2, 0.7, 0.41, 0.55, 0.1]  # cut at 0.45: 3 above (0.9, 0.7, 0.55)
    cal = {"kind": "logistic", "midpoint": 0.45, "slope": 12.0, "source": "fitted", "n_same": 10, "n_near": 10}
    rows = _write_rows(tmp_path, scores, cal)
    report = tmp_path / "rep"
    write_score_report(rows, report, page_size=page_size)
    sequence = [s for p in _pages(report) for s in parse(p).sequence]
    assert sequence == ["card"] * 3 + ["cut"] + ["card"] * 3
    assert len(_pages(report)) == math.ceil(len(scores) / page_size)
    assert "Calibration: fitted" in (report / "index.html").read_text()


def test_uncalibrated_runs_say_so_and_draw_no_cut(tmp_path):
    rows = _write_rows(tmp_path, [0.9, 0.1, 0.6], None)
    write_score_report(rows, tmp_path / "rep")
    page = _pages(tmp_path / "rep")[0]
    assert "cut" not in parse(page).sequence and "Uncalibrated" in page.read_text()


def test_bootstrap_interval_of_the_mean_matches_the_normal_closed_form():
    x = np.random.default_rng(1).normal(2.0, 3.0, 900)
    lo, hi = bootstrap_interval(x, lambda v: v.mean(axis=1), n_resamples=2000, seed=0)
    half = 1.96 * x.std() / math.sqrt(x.size)  # 0.196
    assert abs((lo + hi) / 2 - x.mean()) < 0.25 * half and abs((hi - lo) / 2 - half) < 0.15 * half
    assert bootstrap_interval(np.full(5, 0.3), lambda v: v.mean(axis=1)) == (0.3, 0.3)


def test_sweep_table_marks_overlapping_groups_only():
    rng = np.random.default_rng(0)
    groups = {"a": rng.normal(0.8, 0.01, 50), "b": rng.normal(0.8005, 0.01, 50), "c": rng.normal(0.2, 0.01, 50)}
    table = {g["group"]: g for g in sweep_table(groups, threshold=0.5, n_resamples=300)}
    assert table["a"]["overlaps"] == ["b"] and table["b"]["overlaps"] == ["a"] and table["c"]["overlaps"] == []
    assert table["a"]["share"] == 1.0 and table["c"]["share"] == 0.0 and table["c"]["share_ci"] == (0.0, 0.0)


def test_group_of_reads_folder_levels():
    assert group_of("run/ckpt-5/dog/0.png", "dog", "1") == "dog"
    assert group_of("run/ckpt-5/dog/0.png", "dog", "2") == "ckpt-5"
    assert group_of("0.png", "dog", "3") == "(none)"
    assert group_of("run/x/0.png", "cat", "subject") == "cat"


def test_bad_report_options_stop_with_a_clear_error(tmp_path, capsys):
    rows = _write_rows(tmp_path, [0.5], None)
    assert main(["report", str(rows), "--out", str(tmp_path / "r"), "--group-by", "checkpoint"]) == EXIT_BAD_INPUT
    assert "--group-by must be 'subject' or a folder level" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert "missing.csv does not exist" in capsys.readouterr().err
    write_image(tmp_path / "ref.png", np.random.default_rng(0))
    assert main(["score", "--reference", str(tmp_path / "ref.png"), str(tmp_path), "-o", str(tmp_path / "o.csv"),
                 "--group-by", "1", *TINY_MODEL_ARGS]) == EXIT_BAD_INPUT
    assert "add --report DIR" in capsys.readouterr().err
