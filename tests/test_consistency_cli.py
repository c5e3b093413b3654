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


# ---------------------------------------------------------------- --scorer (standard metrics)
RANDOM = ["--random-weights", "--seed", "0", "--device", "cpu", "--dtype", "fp32"]


def _scorer_run(*args: str) -> int:
    return main(["consistency", *args, *RANDOM])


def _numpy_cosines(embeddings) -> np.ndarray:
    """Second implementation of the matrix: plain numpy cosines of the model's own embeddings."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return e @ e.T


@pytest.mark.parametrize("spec", ["pooled:tiny-dino", "pooled:tiny-clip"])
def test_a_baseline_scorer_gives_its_own_models_matrix_and_the_robust_rule(folders, tmp_path, tiny_model, spec):
    from comfy_nearid.evaluate.scorers import scorer_model

    cache_path = tmp_path / "emb.sqlite"
    head_out, out = tmp_path / "head.jsonl", tmp_path / "s.jsonl"
    assert _run(str(folders / "alpha"), "-o", str(head_out), "--cache", str(cache_path), "--no-html") == 0
    assert _scorer_run(str(folders / "alpha"), "-o", str(out), "--scorer", spec, "--cache", str(cache_path),
                       "--no-html") == 0
    with EmbeddingCache(cache_path) as cache:
        assert cache.count() == 10  # the scorer's embeddings live beside the head's, never read for them
    paths = sorted((folders / "alpha").glob("*.png"))
    model = scorer_model(spec, device="cpu", dtype="fp32", pretrained=False, seed=0)
    want = _numpy_cosines(model.embed(paths).numpy())
    journal = [json.loads(line) for line in out.with_name("s.sets.jsonl").read_text().splitlines()]
    assert [Path(p) for p in journal[0]["paths"]] == paths
    np.testing.assert_allclose(np.array(journal[0]["matrix"], dtype=np.float64), want, atol=1e-5)
    head_matrix = _numpy_cosines(tiny_model.embed(paths).numpy())
    assert np.abs(want - head_matrix).max() > 1e-2  # the run did not fall back to the head
    rows = read_rows(out)
    n = len(paths)
    np.testing.assert_allclose([r["mean_to_others"] for r in rows], (want.sum(1) - 1) / (n - 1), atol=1e-5)
    summary = json.loads(out.with_name("s.summary.json").read_text())
    s = summary["sets"]["alpha"]
    assert summary["scorer"] == spec and summary["calibration"] is None
    assert s["calibrated_match"] is None and s["threshold_rule"] == "robust-z"  # a baseline has no curve
    assert s["mean_pairwise"] == pytest.approx(want[np.triu_indices(n, 1)].mean(), abs=1e-5)
    config = json.loads(out.with_name("s.config.json").read_text())
    assert config["scorer"] == spec and config["model_identity"] == model.identity


def test_a_head_scorer_with_a_fitted_curve_gives_the_calibrated_match(folders, tmp_path, tiny_model):
    head = tmp_path / "fitted.safetensors"
    tiny_model.save_head(head, calibration={"kind": "logistic", "midpoint": 0.3, "slope": 10.0})
    out = tmp_path / "h.jsonl"
    assert _scorer_run(str(folders / "alpha"), "-o", str(out), "--scorer", f"head:{head}", "--no-cache",
                       "--no-html") == 0
    paths = sorted((folders / "alpha").glob("*.png"))
    want = _numpy_cosines(tiny_model.embed(paths).numpy())
    mean = want[np.triu_indices(len(paths), 1)].mean()
    s = json.loads(out.with_name("h.summary.json").read_text())["sets"]["alpha"]
    assert s["threshold_rule"] == "calibrated-50"
    assert s["calibrated_match"] == pytest.approx(100 / (1 + np.exp(-10.0 * (mean - 0.3))), abs=1e-3)


def test_resume_with_another_scorer_is_refused(folders, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert _run(str(folders / "alpha"), "-o", str(out), "--no-cache", "--no-html") == 0
    before = out.read_text()
    capsys.readouterr()
    assert _scorer_run(str(folders / "alpha"), "-o", str(out), "--no-cache", "--no-html", "--resume",
                       "--scorer", "pooled:tiny-dino") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "scorer='head'" in err and "'pooled:tiny-dino'" in err and "Traceback" not in err
    assert out.read_text() == before


@pytest.mark.parametrize("scorer,extra,message", [
    ("clip-x", [], "scorer spec 'clip-x'"),
    ("blob:tiny-dino", [], "scorer spec 'blob:tiny-dino'"),
    ("pooled:no-such-backbone", [], "no-such-backbone"),
    ("feature:object", [], "feature scorers need object masks"),
    ("pooled:tiny-dino", ["--backbone", "tiny-siglip"], "--backbone belong to --scorer head"),
])
def test_a_bad_scorer_names_the_value(folders, tmp_path, capsys, scorer, extra, message):
    out = tmp_path / "b.csv"
    assert _scorer_run(str(folders / "alpha"), "-o", str(out), "--no-cache", "--no-html", "--scorer", scorer,
                       *extra) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
