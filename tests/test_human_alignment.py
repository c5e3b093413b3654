"""DreamBench++ human alignment: the published score files reproduce the published MH values.

Expected values are the published ones (the bundled ``comfy_nearid/data/dreambench_plus/README.md``),
to 3 decimals. Key reconciliation and refusals are checked on small rating trees written here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from comfy_nearid.cli import main
from comfy_nearid.errors import DatasetError, InvalidInputError
from comfy_nearid.metrics.human import (
    bundled_dreambench_ratings,
    check_same_items,
    human_alignment,
    normalize_metric_key,
    parse_categories,
)

# The published rating files, bundled (gzip) with the package: this test never skips.
RATINGS = bundled_dreambench_ratings()
# The README gives MH to 3 decimals: a value reproduces it when it lies within half a unit of
# the last decimal (a comparison of rounded values would flip on a value ending in ...5).
HALF_UNIT = 0.0005 + 1e-12


def _reproduces(value: float, published: float) -> bool:
    return abs(value - published) <= HALF_UNIT


# Published MH values (object category unless stated), from the README of the bundled files.
PUBLISHED_OBJECT = {
    "human": 0.648,
    "data_gpt_rating/concept_preservation_full": 0.597,
    "data_dino_rating": 0.492,
    "data_clipi_rating": 0.493,
    "data_backbone_rating": 0.515,
    "data_backbone_maphead_rating": 0.489,
    "data_nearid_rating": 0.545,
}
PUBLISHED_OTHER = {
    "data_backbone_rating": {"live_subject_animal": 0.333, "live_subject_human": 0.376, "style": 0.441},
    "data_backbone_maphead_rating": {"live_subject_animal": 0.369, "live_subject_human": 0.397, "style": 0.398},
    "data_nearid_rating": {"live_subject_animal": 0.435, "live_subject_human": 0.440, "style": 0.349},
}


def test_published_object_mh_values_reproduce():
    result = human_alignment(RATINGS, list(PUBLISHED_OBJECT), parse_categories(["object"]))
    for metric, expected in PUBLISHED_OBJECT.items():
        assert _reproduces(result[metric]["object"]["mh"], expected), (metric, result[metric]["object"]["mh"])
        assert len(result[metric]["object"]["per_method"]) == 7
        assert all(v["n_items"] == 585 for v in result[metric]["object"]["per_method"].values())


def test_published_other_categories_reproduce():
    metrics = list(PUBLISHED_OTHER)
    result = human_alignment(RATINGS, metrics, parse_categories(list(PUBLISHED_OTHER["data_nearid_rating"])))
    for metric, per_cat in PUBLISHED_OTHER.items():
        for category, expected in per_cat.items():
            assert _reproduces(result[metric][category]["mh"], expected), (metric, category)


def test_cli_human_prints_table_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "mh.json"
    rc = main(["eval", "human", "--ratings", str(RATINGS), "--metric", "data_nearid_rating",
               "--metric", "human", "--out", str(tmp_path / "out"), "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| data_nearid_rating | 0.545 |" in printed and "| human | 0.648 |" in printed
    data = json.loads(out_json.read_text())
    assert _reproduces(data["data_nearid_rating"]["object"]["mh"], 0.545)
    assert set(data["data_nearid_rating"]["object"]["per_method"]) >= {"emu2", "dreambooth_sd"}
    assert (tmp_path / "out" / "eval_config.json").is_file()


def test_bundled_files_are_the_published_ones():
    """Every bundled file decompresses to the published bytes listed in SHA256SUMS, and the
    bundle holds nothing else."""
    bundle = RATINGS.parent
    listed = dict(line.split("  ", 1)[::-1] for line in (bundle / "SHA256SUMS").read_text().splitlines())
    assert len(listed) == 56  # 7 methods x (2 human groups + 6 metrics)
    present = sorted(p.relative_to(bundle).as_posix() for p in RATINGS.rglob("*") if p.is_file())
    assert present == sorted(name + ".gz" for name in listed)
    for name, digest in listed.items():
        assert hashlib.sha256(gzip.decompress((bundle / (name + ".gz")).read_bytes())).hexdigest() == digest, name
    assert "Apache-2.0" in (bundle / "README.md").read_text() and (bundle / "PROVENANCE.md").is_file()


def test_cli_default_ratings_score_a_users_own_metric_folder(tmp_path, monkeypatch, capsys):
    """`nearid eval human --metric DIR` with no --ratings: DIR (relative to the working
    directory, plain .json files as `nearid score --dreambench-json` writes them) is aligned
    with the bundled human ratings. A copy of the published NearID scores gives their MH."""
    mine = tmp_path / "my_metric"
    mine.mkdir()
    for path in (RATINGS / "data_nearid_rating").glob("*.json.gz"):
        (mine / path.name[: -len(".gz")]).write_bytes(gzip.decompress(path.read_bytes()))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "human", "--metric", "my_metric", "--out", "out"]) == 0
    assert "| my_metric | 0.545 |" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "eval_config.json").read_text())
    assert config["ratings"].startswith("bundled")


def test_key_reconciliation():
    assert normalize_metric_key("live_subject_animal_00_kitten-0_0") == "live_subject_animal_00_kitten-0"
    assert normalize_metric_key("object_20_rubik's_cube-1_0") == "object_20_magic_cube-1"
    assert normalize_metric_key("object_20_magic_cube-1") == "object_20_magic_cube-1"


# ------------------------------------------------------------------ small synthetic trees

METHODS = ("m_a", "m_b")


def _human_keys(n: int = 12) -> list[str]:
    return [f"object_0{i // 3}_thing-{i % 3}" for i in range(n // 2)] + \
        [f"style_0{i // 3}_art-{i % 3}" for i in range(n - n // 2)]


def _tree(tmp_path: Path, metric_keys: dict[str, list[str]] | None = None) -> Path:
    """Two methods, 12 items (object/style), human groups and one metric directory."""
    rng = np.random.default_rng(0)
    human_keys = _human_keys()
    root = tmp_path / "ratings"
    for gi, g in enumerate(("group1", "group2")):
        d = root / "data_human_rating" / "merged_data" / g
        d.mkdir(parents=True)
        for mi, m in enumerate(METHODS):
            # integer ratings 0..4 that vary within every category
            ratings = {k: (i * 3 + gi * 2 + mi) % 5 for i, k in enumerate(human_keys)}
            (d / f"{m}-cp.json").write_text(json.dumps(ratings))
    d = root / "metric_x"
    d.mkdir()
    for m in METHODS:
        keys = (metric_keys or {}).get(m, [f"{k}_0" for k in human_keys])
        d.joinpath(f"{m}.json").write_text(json.dumps({k: float(rng.normal()) for k in keys}))
    return root


def _pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.corrcoef(x, y)[0, 1])


def test_small_tree_matches_formula(tmp_path):
    root = _tree(tmp_path)
    result = human_alignment(root, ["metric_x"], {"object": "object"})["metric_x"]["object"]
    zs = []
    for m in METHODS:
        g1 = json.loads((root / "data_human_rating/merged_data/group1" / f"{m}-cp.json").read_text())
        g2 = json.loads((root / "data_human_rating/merged_data/group2" / f"{m}-cp.json").read_text())
        s = json.loads((root / "metric_x" / f"{m}.json").read_text())
        idx = [i for i, k in enumerate(g1) if k.startswith("object")]
        sv, a, b = (np.array(list(d.values()), float)[idx] for d in (s, g1, g2))
        r = (_pearson(sv, a) + _pearson(sv, b)) / 2
        assert result["per_method"][m]["r"] == pytest.approx(r)
        zs.append(math.atanh(max(-0.9999, min(0.9999, r))))
    assert result["mh"] == pytest.approx(math.tanh(sum(zs) / len(zs)))


def test_rubiks_cube_key_is_reconciled(tmp_path):
    root = _tree(tmp_path)
    # rename one human item to magic_cube and give the metric file the rubik's_cube spelling
    for g in ("group1", "group2"):
        for m in METHODS:
            p = root / "data_human_rating/merged_data" / g / f"{m}-cp.json"
            data = json.loads(p.read_text())
            p.write_text(json.dumps({k.replace("object_00_thing", "object_00_magic_cube"): v for k, v in data.items()}))
    for m in METHODS:
        p = root / "metric_x" / f"{m}.json"
        data = json.loads(p.read_text())
        p.write_text(json.dumps({k.replace("object_00_thing", "object_00_rubik's_cube"): v for k, v in data.items()}))
    result = human_alignment(root, ["metric_x"], {"object": "object"})
    assert math.isfinite(result["metric_x"]["object"]["mh"])


def test_files_of_different_lengths_are_refused_with_both_lengths(tmp_path):
    root = _tree(tmp_path, metric_keys={"m_b": ["object_00_thing-0_0", "object_00_thing-1_0"]})
    with pytest.raises(DatasetError, match=r"m_b\.json has 2 items.*m_b-cp\.json has 12"):
        human_alignment(root, ["metric_x"], {"object": "object"})


def test_diverging_order_names_the_position(tmp_path):
    swapped = [f"{k}_0" for k in _human_keys()]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    root = _tree(tmp_path, metric_keys={"m_a": swapped})
    with pytest.raises(DatasetError, match=r"diverge at item 1.*object_00_thing-2_0.*object_00_thing-1"):
        human_alignment(root, ["metric_x"], {"object": "object"})
    with pytest.raises(DatasetError, match="different lengths: a has 1 items, b has 2"):
        check_same_items(["x_0"], ["x", "y"], "a", "b")


def test_bad_rating_values_and_layout(tmp_path):
    root = _tree(tmp_path)
    (root / "metric_x" / "m_a.json").write_text(json.dumps({"object_00_thing-0_0": "high"}))
    with pytest.raises(DatasetError, match=r"m_a\.json: item 'object_00_thing-0_0' has score 'high'"):
        human_alignment(root, ["metric_x"], {"object": "object"})
    (root / "metric_x" / "m_a.json").unlink()
    with pytest.raises(DatasetError, match="no file for method 'm_a'"):
        human_alignment(root, ["metric_x"], {"object": "object"})
    with pytest.raises(DatasetError, match="metric directory not found"):
        human_alignment(root, ["nope"], {"object": "object"})
    with pytest.raises(DatasetError, match="human ratings directory not found"):
        human_alignment(tmp_path / "elsewhere", ["metric_x"], None)
    with pytest.raises(DatasetError, match="matches 0 item"):
        human_alignment(_tree(tmp_path / "t2"), ["metric_x"], {"live": "live_subject"})
    with pytest.raises(InvalidInputError, match="invalid regex"):
        parse_categories(["bad=("])


def test_cli_reports_error_for_missing_ratings(tmp_path, capsys):
    rc = main(["eval", "human", "--ratings", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "human ratings directory not found" in capsys.readouterr().err
