"""The synthetic benchmark: determinism, exact shared backgrounds, disjoint splits, edit levels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_nearid.data import FolderDataset, MTGFolderDataset, generate_benchmark, iter_loaded_samples, read_manifest
from comfy_nearid.data.synth import encode_png
from comfy_nearid.errors import DatasetError, InvalidInputError

SIZE = 96
N_TRAIN, N_TEST, N_MTG = 6, 4, 3
LEVELS = ("object", "part", "colour")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "bench"
    generate_benchmark(root, N_TRAIN, N_TEST, image_size=SIZE, seed=3, n_mtg=N_MTG, progress=False)
    return root


def _arr(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _nearid_dirs(root: Path, split: str) -> list[Path]:
    return sorted(p for p in (root / split).iterdir() if p.is_dir())


def test_layout_and_manifest(bench):
    manifest = read_manifest(bench)
    assert manifest["seed"] == 3 and manifest["image_size"] == SIZE and manifest["generator_version"] >= 1
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": N_TRAIN, "test": N_TEST, "mtg_test": N_MTG}
    assert manifest["config"]["n_train"] == N_TRAIN
    d = _nearid_dirs(bench, "train")[0]
    names = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    expected = {"sample.json"} | {f"{kind}{k}.png" for kind in ("view", "mask") for k in (1, 2, 3)}
    expected |= {f"{lv}/{kind}{k}.png" for lv in LEVELS for kind in ("distractor", "mask") for k in (1, 2, 3)}
    assert names == expected
    m = _nearid_dirs(bench, "mtg_test")[0]
    assert {p.name for p in m.iterdir()} == {"sample.json"} | {
        f"{kind}{k}.png" for kind in ("view", "edited", "object_mask", "part_mask") for k in (1, 2)}
    view = Image.open(d / "view1.png")
    assert view.mode == "RGB" and view.size == (SIZE, SIZE)
    assert Image.open(d / "mask1.png").mode == "L"
    with pytest.raises(DatasetError, match="benchmark root"):
        FolderDataset(bench)


@pytest.mark.slow  # a pool of 2 worker processes
def test_same_seed_same_bytes_and_workers_do_not_matter(bench, tmp_path):
    again = tmp_path / "again"
    generate_benchmark(again, N_TRAIN, N_TEST, image_size=SIZE, seed=3, n_mtg=N_MTG, workers=2, progress=False)
    assert _files(again) == _files(bench)
    other = tmp_path / "other"
    generate_benchmark(other, 1, 0, image_size=SIZE, seed=4, n_mtg=0, progress=False)
    assert (other / "train/train-00000/view1.png").read_bytes() != (bench / "train/train-00000/view1.png").read_bytes()


def test_levels_use_independent_random_streams(bench, tmp_path):
    only = tmp_path / "only_object"
    generate_benchmark(only, N_TRAIN, 0, image_size=SIZE, seed=3, n_mtg=0, levels=("object",), progress=False)
    for rel in ("view1.png", "view3.png", "mask2.png", "object/distractor2.png"):
        assert (only / "train/train-00001" / rel).read_bytes() == (bench / "train/train-00001" / rel).read_bytes()
    assert not (only / "train/train-00001/part").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_distractor_background_is_the_views_outside_the_masks(bench, split):
    for d in _nearid_dirs(bench, split):
        for k in (1, 2, 3):
            view, view_mask = _arr(d / f"view{k}.png"), _arr(d / f"mask{k}.png")
            for level in LEVELS:
                dis, dis_mask = _arr(d / level / f"distractor{k}.png"), _arr(d / level / f"mask{k}.png")
                outside = (view_mask == 0) & (dis_mask == 0)
                assert outside.mean() > 0.3
                assert np.array_equal(view[outside], dis[outside]), (d.name, level, k)
                inside = ~outside
                changed = np.any(view != dis, axis=-1)
                assert changed[inside].sum() > 0.005 * inside.sum(), (d.name, level, k)


def _background_correlation(a: Path, b: Path, mask_a: Path, mask_b: Path) -> float:
    """Largest per-channel Pearson r of two images over the pixels outside both objects
    (a shared scene under another gain/tint keeps r near 1)."""
    x, y = _arr(a).astype(float), _arr(b).astype(float)
    keep = (_arr(mask_a) == 0) & (_arr(mask_b) == 0)
    rs = []
    for c in range(3):
        u, v = x[..., c][keep], y[..., c][keep]
        if u.std() < 1e-6 or v.std() < 1e-6:
            rs.append(1.0 if abs(u.mean() - v.mean()) < 1 else 0.0)
            continue
        rs.append(float(np.corrcoef(u, v)[0, 1]))
    return max(rs)


def test_views_of_one_identity_have_different_backgrounds(bench):
    for split in ("train", "test"):
        for d in _nearid_dirs(bench, split):
            meta = json.loads((d / "sample.json").read_text())
            assert len({v["background"] for v in meta["views"]}) == 3
            for i, j in ((1, 2), (1, 3), (2, 3)):
                r = _background_correlation(d / f"view{i}.png", d / f"view{j}.png", d / f"mask{i}.png", d / f"mask{j}.png")
                assert r < 0.95, (d.name, i, j, r)
            poses = [(v["pose"]["cx"], v["pose"]["cy"], v["pose"]["angle_deg"]) for v in meta["views"]]
            assert len(set(poses)) == 3


def test_splits_are_disjoint(bench):
    def collect(split):
        ids, cats, bgs = set(), set(), set()
        for d in sorted(p for p in (bench / split).iterdir() if p.is_dir()):
            meta = json.loads((d / "sample.json").read_text())
            ids.add(meta["id"])
            cats.add(meta["category"])
            bgs |= {v["background"] for v in meta["views"]}
        return ids, cats, bgs

    train, test, mtg = collect("train"), collect("test"), collect("mtg_test")
    for a, b in ((train, test), (train, mtg), (test, mtg)):
        assert not a[0] & b[0] and not a[2] & b[2]
    assert not train[1] & test[1] and not train[1] & mtg[1]
    # pixel level: no test view shows a training scene
    for dt in _nearid_dirs(bench, "test"):
        for dr in _nearid_dirs(bench, "train"):
            for k in (1, 2, 3):
                r = _background_correlation(dt / f"view{k}.png", dr / f"view{k}.png", dt / f"mask{k}.png", dr / f"mask{k}.png")
                assert r < 0.95, (dt.name, dr.name, k, r)


def test_object_fills_a_good_part_of_the_frame(bench):
    sides = []
    for split in ("train", "test"):
        for d in _nearid_dirs(bench, split):
            for k in (1, 2, 3):
                ys, xs = np.nonzero(_arr(d / f"mask{k}.png") > 127)
                sides.append(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / SIZE)
    assert 0.35 <= float(np.mean(sides)) <= 0.6, np.mean(sides)
    assert min(sides) >= 0.25 and max(sides) <= 0.75, (min(sides), max(sides))


def _groups_changed(a: dict, b: dict) -> set[str]:
    changed = {name for name in ("body", "body_colour", "decal", "parts", "outline_colour") if a[name] != b[name]}
    if a["pattern"]["kind"] != b["pattern"]["kind"]:
        changed.add("pattern_kind")
    elif a["pattern"] != b["pattern"]:
        changed.add("pattern_other")
    return changed


def test_edit_levels_change_what_they_claim(bench):
    for split in ("train", "test"):
        for d in _nearid_dirs(bench, split):
            meta = json.loads((d / "sample.json").read_text())
            identity = meta["identity"]
            for k in range(3):
                obj = meta["distractors"]["object"][k]["spec"]
                changed = _groups_changed(identity, obj)
                assert len(changed) >= 2 and changed & {"pattern_kind", "body", "parts"}, (d.name, k, changed)
                assert obj["category"] == identity["category"]

                part = meta["distractors"]["part"][k]["spec"]
                assert _groups_changed(identity, part) == {"parts"}
                diffs = [i for i, (p, q) in enumerate(zip(identity["parts"], part["parts"])) if p != q]
                assert len(diffs) == 1 and len(part["parts"]) == len(identity["parts"])

                colour = meta["distractors"]["colour"][k]["spec"]
                assert _groups_changed(identity, colour) == {"body_colour"}
                # same outline: the mask files are byte-identical
                assert (d / "colour" / f"mask{k + 1}.png").read_bytes() == (d / f"mask{k + 1}.png").read_bytes()


def test_mtg_part_masks_cover_the_edit(bench):
    ds = MTGFolderDataset(bench, split="mtg_test")
    assert len(ds) == N_MTG
    for sample in iter_loaded_samples(ds):
        for k in range(2):
            view = np.asarray(sample.views[k], dtype=int)
            edited = np.asarray(sample.distractors["mtg"][k], dtype=int)
            part = np.asarray(sample.part_masks[k]) > 0
            obj = np.asarray(sample.masks[k]) > 127
            diff = np.abs(view - edited).max(axis=-1)
            assert diff.max() > 20  # the edit is visible
            assert diff[~part].max(initial=0) <= 1  # and confined to the part mask (1 level of rounding)
            oracle = 1.0 - (np.asarray(sample.part_masks[k]) > 127).sum() / obj.sum()
            assert 0.0 < oracle < 1.0


def test_readers_read_the_benchmark(bench):
    train = FolderDataset(bench, split="train")
    assert len(train) == N_TRAIN and train.ids == [f"train-{i:05d}" for i in range(N_TRAIN)]
    s = train[2]
    assert s.sources == sorted(LEVELS) and s.valid_views() == [0, 1, 2]
    assert s.category == json.loads((bench / "train/train-00002/sample.json").read_text())["category"]
    assert s.meta["description"]
    loaded = list(iter_loaded_samples(FolderDataset(bench, split="test")))
    assert len(loaded) == N_TEST and all(m.mode == "L" for m in loaded[0].masks)


def test_encode_png_round_trips(rng):
    for shape in ((5, 7, 3), (9, 4), (1, 1, 3)):
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with Image.open(io.BytesIO(encode_png(arr, 1))) as im:
            assert np.array_equal(np.asarray(im), arr)
            assert im.mode == ("RGB" if len(shape) == 3 else "L")
    with pytest.raises(InvalidInputError, match="uint8"):
        encode_png(np.zeros((3, 3), np.float32), 1)
    with pytest.raises(InvalidInputError, match=r"\(3, 3, 4\)"):
        encode_png(np.zeros((3, 3, 4), np.uint8), 1)


def test_bad_settings_are_refused(tmp_path):
    cases = [
        (dict(n_train=-1, n_test=1), "n_train must be an integer >= 0, got -1"),
        (dict(n_train=1, n_test=1, image_size=8), "image_size must be an integer in 32..2048, got 8"),
        (dict(n_train=1, n_test=1, levels=("object", "shape")), r"levels must be distinct names from .*'shape'"),
        (dict(n_train=1, n_test=1, n_views=1), "n_views must be an integer in 2..8"),
        (dict(n_train=1, n_test=1, object_fill=(0.7, 0.4)), "object_fill"),
        (dict(n_train=1, n_test=1, workers=0), "workers must be an integer >= 1, got 0"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(InvalidInputError, match=pattern):
            generate_benchmark(tmp_path / "out", progress=False, **kwargs)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not empty and holds no synthetic benchmark"):
        generate_benchmark(tmp_path / "foreign", 1, 0, image_size=32, progress=False)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_cli(tmp_path, capsys):
    from comfy_nearid.cli import main

    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--train", "2", "--test", "1", "--mtg", "1", "--size", "48", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train 2, test 1, mtg_test 1 identities" in text and "images/s" in text
    assert read_manifest(out)["config"]["image_size"] == 48
    assert main(args) == 2
    assert "already holds a benchmark" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--levels", "part"]) == 0
    assert not (out / "train/train-00000/object").exists() and (out / "train/train-00000/part").is_dir()
    assert main(["synth", "--out", str(tmp_path / "x"), "--levels", " , "]) == 2
    assert "--levels" in capsys.readouterr().err


def test_verbose_cli_logs_this_package_not_the_png_decoder(tmp_path, caplog):
    """`nearid -v` turns on the package's debug lines, not PIL's two lines per PNG read (a demo
    run under -v logged tens of thousands of them)."""
    import logging

    from comfy_nearid.cli import main

    caplog.set_level(logging.DEBUG)
    out = tmp_path / "cli"
    assert main(["-v", "synth", "--out", str(out), "--train", "2", "--test", "1", "--mtg", "1", "--size", "48",
                 "--no-progress"]) == 0
    first = sorted(out.rglob("*.png"))[0]
    caplog.clear()
    with Image.open(first) as im:
        im.load()
    logging.getLogger("comfy_nearid.data").debug("still on")
    names = [r.name for r in caplog.records]
    assert "comfy_nearid.data" in names and not [n for n in names if n.startswith("PIL")], names


def test_a_shared_render_memo_changes_no_pixel():
    """The renders of one view share shape coverages through a memo (a view, then its object,
    part and colour distractors, as render_identity draws them): every render equals the same
    render made alone, without a memo, exactly."""
    from comfy_nearid.data.synth import SynthConfig, _edit, _identity_spec, _view_setups
    from comfy_nearid.data.synth_render import RenderMemo, render_object

    config = SynthConfig(n_train=6, n_test=0, n_mtg=0)
    shared_entries = alone_entries = 0
    for index in range(6):
        spec = _identity_spec(config, "train", index)
        setup = _view_setups(config, "train", index, spec, 1)[0]
        rng = np.random.default_rng(index)
        variants = [spec] + [_edit(level, spec, rng)[0] for level in ("object", "part", "colour")]
        memo = RenderMemo()
        for variant in variants:
            with_memo = render_object(variant, setup.pose, setup.light, config.image_size, memo)
            own = RenderMemo()
            alone = render_object(variant, setup.pose, setup.light, config.image_size, own)
            alone_entries += len(own._values)
            assert with_memo.box == alone.box
            np.testing.assert_array_equal(with_memo.colour, alone.colour)
            np.testing.assert_array_equal(with_memo.alpha, alone.alpha)
            assert len(with_memo.part_cover) == len(alone.part_cover)
            for a, b in zip(with_memo.part_cover, alone.part_cover):
                np.testing.assert_array_equal(a, b)
        shared_entries += len(memo._values)
    assert 0 < shared_entries < alone_entries  # shapes were computed once for several renders
