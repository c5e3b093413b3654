"""FolderDataset on hand-written folders: order, missing views/distractors, masks, bad layouts."""

from __future__ import annotations

import json

import pytest

from comfy_nearid.data import FolderDataset, SkipReport, iter_loaded_samples
from comfy_nearid.errors import DatasetError

from _data_helpers import distractor_colour, make_folder_sample, pixel, view_colour, write_png


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    make_folder_sample(root, "b-second", 1, sources={"flux": (1, 2, 3), "sdxl": (1, 2, 3)}, masks=(1, 2, 3),
                       meta={"category": "mug", "description": "a red mug", "quality": 5})
    make_folder_sample(root, "a-first", 0, views=(1, 3), sources={"flux": (1, 3)})  # view2 missing
    make_folder_sample(root, "c-third", 2, views=(1, 2), sources={"flux": (1,)})  # distractor2 missing
    (root / ".hidden").mkdir()
    (root / "_cache").mkdir()
    (root / "README.txt").write_text("not a sample")
    return root


def test_sorted_order_len_and_indexing(folder):
    ds = FolderDataset(folder)
    assert len(ds) == 3
    assert [s.id for s in ds] == ["a-first", "b-second", "c-third"]
    assert ds.ids == ["a-first", "b-second", "c-third"]
    assert ds[-1].id == "c-third"
    with pytest.raises(IndexError, match="out of range"):
        ds[3]


def test_views_distractors_masks_and_meta(folder):
    s = FolderDataset(folder)[1]
    assert s.category == "mug"
    assert s.meta["description"] == "a red mug" and s.meta["quality"] == 5
    assert s.sources == ["flux", "sdxl"]
    assert s.valid_views() == [0, 1, 2]
    loaded = s.load()
    assert [pixel(v) for v in loaded.views] == [view_colour(1, k) for k in (1, 2, 3)]
    # sources are numbered in sorted order by the fixture writer: flux 0, sdxl 1
    assert [pixel(d) for d in loaded.distractors["sdxl"]] == [distractor_colour(1, k, 1) for k in (1, 2, 3)]
    assert loaded.masks[0].mode == "L" and pixel(loaded.masks[0]) == (255,)
    assert pixel(loaded.distractor_masks["flux"][1]) == (128,)


def test_missing_view_and_missing_distractor_are_none(folder):
    ds = FolderDataset(folder)
    a = ds[0]
    assert a.valid_views() == [0, 2] and a.views[1] is None
    assert a.distractors["flux"][1] is None and a.distractors["flux"][2] is not None
    assert a.category == "unknown" and a.masks == [None, None, None]
    c = ds[2]
    assert len(c.views) == 2 and c.distractors["flux"] == [c.distractors["flux"][0], None]


def test_sources_filter_gives_all_none_for_absent_source(folder):
    ds = FolderDataset(folder, sources=["sdxl"])
    assert ds[0].sources == ["sdxl"] and ds[0].distractors["sdxl"] == [None, None, None]
    assert ds[1].distractors["sdxl"][0] is not None
    assert "flux" not in ds[1].distractors


def test_split_and_indices(tmp_path, folder):
    (tmp_path / "bench").mkdir()
    folder.rename(tmp_path / "bench" / "train")
    (tmp_path / "bench" / "manifest.json").write_text(json.dumps({"splits": {"train": {}}}))
    with pytest.raises(DatasetError, match=r"benchmark root with splits \['train'\]; pass split"):
        FolderDataset(tmp_path / "bench")
    ds = FolderDataset(tmp_path / "bench", split="train", indices=[2, 0])
    assert [s.id for s in ds] == ["c-third", "a-first"] and len(ds) == 2 and ds.ids == ["c-third", "a-first"]
    split_file = tmp_path / "val.json"
    split_file.write_text(json.dumps({"indices": [1]}))
    assert [s.id for s in FolderDataset(tmp_path / "bench", split="train", indices=split_file)] == ["b-second"]
    with pytest.raises(DatasetError, match=r"split folder|does not exist.*splits found.*\['train'\]"):
        FolderDataset(tmp_path / "bench", split="test")


def test_bad_layouts(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        FolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no sample directories"):
        FolderDataset(tmp_path / "empty")
    root = tmp_path / "ds"
    make_folder_sample(root, "noviews", 0, views=(), sources={"flux": (1,)})
    ds = FolderDataset(root)
    with pytest.raises(DatasetError, match=r"noviews has no view images"):
        ds[0]


def test_duplicate_slot_and_bad_numbering(tmp_path):
    root = tmp_path / "ds"
    d = make_folder_sample(root, "s", 0, views=(1,))
    write_png(d / "view1.jpg", (1, 2, 3))
    with pytest.raises(DatasetError, match=r"two files for view1 .*view1.jpg and view1.png"):
        FolderDataset(root)[0]
    (d / "view1.jpg").unlink()
    write_png(d / "view0.png", (1, 2, 3))
    with pytest.raises(DatasetError, match=r"start at 1"):
        FolderDataset(root)[0]


def test_sample_json_problems(tmp_path):
    root = tmp_path / "ds"
    d = make_folder_sample(root, "s", 0, views=(1,))
    (d / "sample.json").write_text("{broken")
    with pytest.raises(DatasetError, match=r"sample.json is not valid JSON"):
        FolderDataset(root)[0]
    (d / "sample.json").write_text(json.dumps({"id": "other"}))
    with pytest.raises(DatasetError, match=r"says id 'other' but its directory is 's'"):
        FolderDataset(root)[0]
    (d / "sample.json").write_text(json.dumps([1, 2]))
    with pytest.raises(DatasetError, match="JSON object"):
        FolderDataset(root)[0]


def test_corrupt_image_in_folder_is_skipped_with_id_and_slot(folder):
    (folder / "b-second" / "sdxl" / "distractor2.png").write_bytes(b"garbage")
    report = SkipReport()
    ids = [s.id for s in iter_loaded_samples(FolderDataset(folder), report=report)]
    assert ids == ["a-first", "c-third"]
    assert [(s.sample_id, s.slot) for s in report.skipped] == [("b-second", "sdxl/distractor2")]
