"""`nearid consistency` on real folders: rows/summary/HTML equal the library, cache, resume, errors."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _comfyui_helpers import structured_images
from comfy_nearid.cli import EXIT_BAD_INPUT, main
from comfy_nearid.consistency import set_consistency
from comfy_nearid.consistency_run import read_rows
from comfy_nearid.embedding_cache import EmbeddingCache

MODEL = ["--backbone", "tiny-siglip", "--random-weights", "--seed", "0", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sets")
    for name, seed in (("alpha", 1), ("beta", 2)):
        (root / name).mkdir()
        for i, arr in enumerate(structured_images(seed, 5, 64, 80)):
            Image.fromarray(arr).save(root / name / f"img{i + 1}.png")
    (root / "beta" / "img0_broken.png").write_bytes(b"not an image")
    return root


def _run(*args: str) -> int:
    return main(["consistency", *args, *MODEL])


def _library(model, paths: list[Path]):
    return set_consistency(model.embed(paths).numpy())


def test_rows_summary_and_page_equal_the_library(folders, tmp_path, tiny_model, capsys):
    out = tmp_path / "c.csv"
    assert _run(str(folders / "alpha"), str(folders / "beta"), "-o", str(out), "--no-cache", "--thumb-size", "40") == 0
    printed = capsys.readouterr().out
    rows = read_rows(out)
    summary = json.loads(out.with_name("c.summary.json").read_text())
    for name in ("alpha", "beta"):
        set_rows = [r for r in rows if r["set"] == name]
        readable = [r for r in set_rows if r["error"] is None]
        want = _library(tiny_model, [Path(r["path"]) for r in readable])
        np.testing.assert_allclose([r["mean_to_others"] for r in readable], want.mean_to_others, atol=1e-5)
        np.testing.assert_allclose([r["to_medoid"] for r in readable], want.to_medoid, atol=1e-5)
        assert [r["group"] for r in readable] == want.groups.tolist()
        index_of = [r["index"] for r in readable]
        s = summary["sets"][name]
        assert s["medoid"] == index_of[want.medoid]
        assert s["outliers"] == [index_of[k] for k in want.outliers]
        assert s["mean_pairwise"] == pytest.approx(want.mean_pairwise, abs=1e-5)
        assert s["min_pairwise"] == pytest.approx(want.min_pairwise, abs=1e-5)
        assert s["calibrated_match"] is None and s["threshold_rule"] == "robust-z"  # no fitted curve
        assert s["description"] in printed
    broken = [r for r in rows if r["path"].endswith("img0_broken.png")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["group"] is None
    assert summary["num_images"] == 11 and summary["num_errors"] == 1
    page = out.with_name("c.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained, offline
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbs) == 10  # every readable image once
    for data in thumbs:
        assert max(Image.open(io.BytesIO(base64.b64decode(data))).size) <= 40
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 2  # one heat-map per set


def test_the_cache_is_shared_and_a_second_run_gives_the_same_rows(folders, tmp_path, tiny_model):
    cache_path = tmp_path / "emb.sqlite"
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _run(str(folders / "alpha"), "-o", str(first), "--cache", str(cache_path), "--no-html") == 0
    with EmbeddingCache(cache_path) as cache:
        assert cache.count() == 5
    assert _run(str(folders / "alpha"), "-o", str(second), "--cache", str(cache_path), "--no-html") == 0
    with EmbeddingCache(cache_path) as cache:
        assert cache.count() == 5
    assert read_rows(first) == read_rows(second)
    assert not first.with_name("a.html").exists()


def test_resume_after_a_crash_mid_set_gives_the_uninterrupted_outputs(folders, tmp_path):
    full = tmp_path / "full.csv"
    assert _run(str(folders / "alpha"), str(folders / "beta"), "-o", str(full), "--no-cache", "--no-html") == 0
    cut = tmp_path / "cut.csv"
    shutil.copy(full, cut)
    shutil.copy(full.with_name("full.config.json"), cut.with_name("cut.config.json"))
    journal = full.with_name("full.sets.jsonl").read_text().splitlines(keepends=True)
    # crash: beta's rows half written, its journal line cut off mid-line
    cut.with_name("cut.sets.jsonl").write_text(journal[0] + journal[1][:50])
    lines = full.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:1 + 5 + 3]))
    assert _run(str(folders / "alpha"), str(folders / "beta"), "-o", str(cut), "--no-cache", "--no-html") == EXIT_BAD_INPUT  # exists
    assert _run(str(folders / "alpha"), str(folders / "beta"), "-o", str(cut), "--no-cache", "--no-html", "--resume") == 0
    assert cut.read_text() == full.read_text()
    want = json.loads(full.with_name("full.summary.json").read_text())["sets"]
    assert json.loads(cut.with_name("cut.summary.json").read_text())["sets"] == want


def test_resume_refuses_other_settings(folders, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert _run(str(folders / "alpha"), "-o", str(out), "--no-cache", "--no-html") == 0
    assert _run(str(folders / "alpha"), "-o", str(out), "--no-cache", "--no-html", "--resume", "--threshold", "0.5") == EXIT_BAD_INPUT
    assert "threshold" in capsys.readouterr().err


def test_mapping_files_name_many_sets(folders, tmp_path):
    mapping = tmp_path / "sets.json"
    mapping.write_text(json.dumps({"first": str(folders / "alpha"),
                                   "mixed": [str(folders / "alpha" / "img1.png"), str(folders / "beta" / "img2.png")]}))
    out = tmp_path / "m.jsonl"
    assert _run("--mapping", str(mapping), "-o", str(out), "--no-cache", "--no-html") == 0
    rows = read_rows(out)
    assert [r["set"] for r in rows] == ["first"] * 5 + ["mixed"] * 2
    csv_mapping = tmp_path / "sets.csv"
    csv_mapping.write_text(f"set,images\nmixed,{folders / 'alpha' / 'img1.png'};{folders / 'beta' / 'img2.png'}\n")
    out2 = tmp_path / "m2.jsonl"
    assert _run("--mapping", str(csv_mapping), "-o", str(out2), "--no-cache", "--no-html") == 0
    assert [r for r in read_rows(out2)] == [r for r in rows if r["set"] == "mixed"]


@pytest.mark.parametrize("case,message", [
    ("missing folder", "is not a folder"),
    ("missing mapping", "does not exist"),
    ("threshold", "threshold must be a cosine"),
    ("output is a folder", "is a directory"),
])
def test_bad_input_is_a_clear_error(folders, tmp_path, capsys, case, message):
    output = tmp_path / "x.csv"
    args = {
        "missing folder": [str(tmp_path / "missing_dir")],
        "missing mapping": ["--mapping", str(tmp_path / "nope.json")],
        "threshold": [str(folders / "alpha"), "--threshold", "2"],
        "output is a folder": [str(folders / "alpha")],
    }[case]
    if case == "output is a folder":
        output.mkdir()
    assert _run(*args, "-o", str(output), "--no-cache", "--no-html") == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_resume_without_the_settings_file_is_refused(folders, tmp_path, capsys):
    out = tmp_path / "n.csv"
    assert _run(str(folders / "alpha"), "-o", str(out), "--no-cache", "--no-html") == 0
    out.with_name("n.config.json").unlink()
    before = out.read_text()
    assert _run(str(folders / "alpha"), "-o", str(out), "--no-cache", "--no-html", "--resume") == EXIT_BAD_INPUT
    assert "settings file" in capsys.readouterr().err and out.read_text() == before
