"""The score report: numbers on the page equal the rows file, thumbnails come from the scoring
pass, the calibrated cut, paging, sweep statistics, bad options."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _scoring_helpers import TINY_MODEL_ARGS, write_broken_files, write_image
from comfy_nearid.cli import EXIT_BAD_INPUT, main
from comfy_nearid.errors import DatasetError
from comfy_nearid.score_report import (
    bootstrap_interval,
    group_of,
    sweep_table,
    thumbnail_name,
    write_score_report,
)
from comfy_nearid.scoring import ROW_FIELDS, read_rows


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
    assert group_of("run/x/0.png", "cat", "checkpoint", {"checkpoint": "ckpt-5"}) == "ckpt-5"
    assert group_of("run/x/0.png", "cat", "checkpoint", {"checkpoint": ""}) == "(none)"


def test_bad_report_options_stop_with_a_clear_error(tmp_path, capsys):
    rows = _write_rows(tmp_path, [0.5], None)
    assert main(["report", str(rows), "--out", str(tmp_path / "r"), "--group-by", "checkpoint"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--group-by 'checkpoint': choose 'subject', a folder level" in err and "carry no mapping column" in err
    assert main(["report", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert "missing.csv does not exist" in capsys.readouterr().err
    write_image(tmp_path / "ref.png", np.random.default_rng(0))
    assert main(["score", "--reference", str(tmp_path / "ref.png"), str(tmp_path), "-o", str(tmp_path / "o.csv"),
                 "--group-by", "1", *TINY_MODEL_ARGS]) == EXIT_BAD_INPUT
    assert "add --report DIR" in capsys.readouterr().err


# ============================================================================ mapping columns
# Which generated folder carries which labels (the mapping file below says the same).
_SWEEP = {  # (subject, folder) -> (checkpoint, method, images)
    ("dog", "run-a/dog"): ("ckpt-100", "lora", 6),
    ("dog", "run-b/dog"): ("ckpt-200", "lora", 5),
    ("cat", "run-a/cat"): ("ckpt-100", "dreambooth", 4),
    ("cat", "run-b/cat"): ("ckpt-200", "", 5),
}
_SWEEP_NUMBER = re.compile(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]")


def _write_sweep(root: Path) -> Path:
    """Two subjects, two checkpoints, labelled by a mapping file's extra columns; returns the mapping."""
    rng = np.random.default_rng(11)
    for i in range(2):
        write_image(root / "refs" / "dog" / f"{i}.png", rng)
    write_image(root / "refs" / "cat.png", rng)
    lines = ["subject,references,generated,checkpoint,method"]
    for (subject, folder), (checkpoint, method, count) in _SWEEP.items():
        for i in range(count):
            write_image(root / "gen" / folder / f"{i}.png", rng)
        refs = "refs/dog" if subject == "dog" else "refs/cat.png"
        lines.append(f"{subject},{refs},gen/{folder},{checkpoint},{method}")
    (root / "map.csv").write_text("\n".join(lines) + "\n")
    return root / "map.csv"


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """The sweep of :func:`_write_sweep` scored with --report --group-by checkpoint."""
    root = tmp_path_factory.mktemp("mapped_report")
    _write_sweep(root)
    rows, report = root / "out" / "scores.csv", root / "report"
    rc = main(["score", "--mapping", str(root / "map.csv"), "-o", str(rows), "--report", str(report),
               "--group-by", "checkpoint", "--no-cache", *TINY_MODEL_ARGS])
    assert rc == 0
    return root, rows, report


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The rows file read with the csv module alone (not the library's reader)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _sweep_rows(index: Path) -> dict[str, dict]:
    """The sweep table of a report page: group -> n and (value, lo, hi) of mean, median, share."""
    out = {}
    for rank, group, n, mean, median, share, _ in parse(index).tables["sweep"]:
        numbers = {}
        for name, cell in (("mean", mean), ("median", median), ("share", share)):
            m = _SWEEP_NUMBER.fullmatch(cell)
            assert m, cell
            numbers[name] = tuple(float(v) for v in m.groups())
        out[group] = {"rank": int(rank), "n": int(n), **numbers}
    return out


def _check_sweep_against_rows(index: Path, rows: list[dict[str, str]], column: str, threshold: float) -> None:
    """Every group's numbers on the page equal statistics computed here from the rows file."""
    page = _sweep_rows(index)
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["score"]:
            groups.setdefault(r[column] or "(none)", []).append(float(r["score"]))
    assert set(page) == set(groups)
    for group, scores in groups.items():
        shown = page[group]
        mean, median = statistics.fmean(scores), statistics.median(scores)
        share = sum(s >= threshold for s in scores) / len(scores)
        assert shown["n"] == len(scores)
        assert abs(shown["mean"][0] - mean) <= 0.5e-4 + 1e-9
        assert abs(shown["median"][0] - median) <= 0.5e-4 + 1e-9
        assert abs(shown["share"][0] - share) <= 0.5e-3 + 1e-9
        lo, hi = shown["mean"][1:]
        assert lo - 0.5e-4 <= mean <= hi + 0.5e-4 and lo < hi  # the bootstrap interval holds the mean
        assert shown["median"][1] <= shown["median"][2] and shown["share"][1] <= shown["share"][2]
    ranked = sorted(page, key=lambda g: page[g]["rank"])
    assert [page[g]["mean"][0] for g in ranked] == sorted((page[g]["mean"][0] for g in ranked), reverse=True)


def test_mapping_columns_are_columns_of_the_rows(mapped):
    root, rows_file, _ = mapped
    header, rows = _csv_rows(rows_file)
    assert header == [*ROW_FIELDS, "checkpoint", "method"]
    expected = {}
    for (subject, folder), (checkpoint, method, count) in _SWEEP.items():
        for i in range(count):
            expected[(subject, str(root / "gen" / folder / f"{i}.png"))] = (checkpoint, method)
    assert {(r["subject"], r["path"]): (r["checkpoint"], r["method"]) for r in rows} == expected
    # the library's reader gives the same labels; the config records the columns
    assert {(r.subject, r.path): (r.labels["checkpoint"], r.labels["method"]) for r in read_rows(rows_file)} == expected
    config = json.loads(rows_file.with_name("scores.config.json").read_text())
    assert config["label_columns"] == ["checkpoint", "method"]


def test_sweep_grouped_by_a_mapping_column_equals_the_rows(mapped):
    _, rows_file, report = mapped
    _, rows = _csv_rows(rows_file)
    assert "mapping column checkpoint" in (report / "index.html").read_text()
    _check_sweep_against_rows(report / "index.html", rows, "checkpoint", threshold=0.5)  # the default curve's cut


def test_nearid_report_groups_by_a_mapping_column_with_a_fitted_cut(mapped, tmp_path):
    """`nearid report` on the rows: a cut between two scores near the middle, so the shares
    above it are neither all 0 nor all 1; an empty label is the group (none)."""
    _, rows_file, _ = mapped
    _, rows = _csv_rows(rows_file)
    scores = sorted({float(r["score"]) for r in rows if r["score"]})
    k = len(scores) // 2
    cut = (scores[k - 1] + scores[k]) / 2
    copy = tmp_path / "scores.csv"
    copy.write_bytes(rows_file.read_bytes())
    (tmp_path / "scores.config.json").write_text(json.dumps({"calibration": {
        "kind": "logistic", "midpoint": cut, "slope": 10.0, "source": "fitted", "n_same": 10, "n_near": 10}}))
    for column in ("checkpoint", "method"):
        out = tmp_path / f"report-{column}"
        assert main(["report", str(copy), "--out", str(out), "--group-by", column]) == 0
        _check_sweep_against_rows(out / "index.html", rows, column, threshold=cut)
    assert set(_sweep_rows(tmp_path / "report-method" / "index.html")) == {"lora", "dreambooth", "(none)"}


def test_resume_after_new_images_keeps_the_label_columns(tmp_path):
    """A finished rows file (label columns in its header) resumed after an image was added:
    the new row is appended with the same columns, and the earlier rows are not redone."""
    mapping = _write_sweep(tmp_path)
    rows_file = tmp_path / "out" / "scores.csv"
    argv = ["score", "--mapping", str(mapping), "-o", str(rows_file), "--no-cache", *TINY_MODEL_ARGS]
    assert main(argv) == 0
    _, before = _csv_rows(rows_file)
    write_image(tmp_path / "gen" / "run-b" / "dog" / "new.png", np.random.default_rng(5))
    assert main([*argv, "--resume"]) == 0
    header, rows = _csv_rows(rows_file)
    assert header == [*ROW_FIELDS, "checkpoint", "method"]
    new = [r for r in rows if r["path"].endswith("new.png")]
    assert [(r["checkpoint"], r["method"]) for r in new] == [("ckpt-200", "lora")]
    assert len(rows) == len(before) + 1
    summary = json.loads(rows_file.with_name("scores.summary.json").read_text())
    assert summary["num_images"] == len(before) + 1


def test_jsonl_rows_carry_labels_and_csv_headers_are_checked(tmp_path):
    from comfy_nearid.scoring.rows import ScoreRow, decode_row, encode_row, row_fields

    row = ScoreRow("g/0.png", "dog", (0.25,), 0.25, 12.5, False, 1, labels={"checkpoint": "ckpt-1", "method": ""},
                   scorer_scores={"clip-i": 0.5})
    fields = row_fields(("checkpoint", "method"), ("clip-i",))
    for fmt in ("jsonl", "csv"):
        line = encode_row(row, fmt, fields)
        assert decode_row(line, fmt, "test", fields) == row
    assert json.loads(encode_row(row, "jsonl", fields))["checkpoint"] == "ckpt-1"
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join([*ROW_FIELDS, "score:x", "checkpoint"]) + "\n")
    with pytest.raises(DatasetError, match="not written by `nearid score`"):
        read_rows(bad)


@pytest.mark.parametrize("column, words", [
    ("score", "column 'score' clashes with a column of the score rows"),
    ("rank", "column 'rank' clashes"),
    ("score:clip", "column 'score:clip' clashes"),
    ("check point", "column 'check point' cannot become a rows column"),
])
def test_mapping_columns_that_clash_with_score_columns_are_refused(tmp_path, capsys, column, words):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "ref.png", rng)
    write_image(tmp_path / "gen" / "0.png", rng)
    (tmp_path / "map.csv").write_text(f'subject,references,generated,"{column}"\ndog,ref.png,gen,x\n')
    out = tmp_path / "o.csv"
    assert main(["score", "--mapping", str(tmp_path / "map.csv"), "-o", str(out), "--no-cache",
                 *TINY_MODEL_ARGS]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert words in err and "map.csv" in err and not out.exists()


def test_one_folder_with_two_labels_is_refused(tmp_path):
    from comfy_nearid.scoring import plan_from_mapping

    rng = np.random.default_rng(0)
    write_image(tmp_path / "ref.png", rng)
    write_image(tmp_path / "gen" / "0.png", rng)
    (tmp_path / "map.csv").write_text("subject,references,generated,checkpoint\n"
                                      "dog,ref.png,gen,a\ndog,ref.png,gen,b\n")
    with pytest.raises(DatasetError, match="also listed at .*line 2.*other labels"):
        plan_from_mapping(tmp_path / "map.csv")


def test_group_by_a_column_the_rows_lack_lists_the_available_ones(mapped, tmp_path, capsys):
    root, rows_file, _ = mapped
    assert main(["report", str(rows_file), "--out", str(tmp_path / "r"), "--group-by", "seed"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--group-by 'seed'" in err and "checkpoint, method" in err
    out = tmp_path / "o.csv"
    assert main(["score", "--mapping", str(root / "map.csv"), "-o", str(out), "--report", str(tmp_path / "r2"),
                 "--group-by", "prompt_set", "--no-cache", *TINY_MODEL_ARGS]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--group-by 'prompt_set'" in err and "checkpoint, method" in err and not out.exists()
