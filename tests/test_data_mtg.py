"""MTGFolderDataset on hand-written folders."""

from __future__ import annotations

import json

import pytest

from comfy_nearid.data import MTG_SOURCE, MTGFolderDataset
from comfy_nearid.errors import DatasetError

from _data_helpers import pixel, write_png


def _mtg_sample(root, name, edited=(1, 2), extra_view=False, meta=None):
    d = root / name
    for k in (1, 2):
        write_png(d / f"view{k}.png", (k, 0, 0))
        write_png(d / f"object_mask{k}.png", 255, mode="L")
        write_png(d / f"part_mask{k}.png", 60 + k, mode="L")
    for k in edited:
        write_png(d / f"edited{k}.png", (0, k, 0))
    if extra_view:
        write_png(d / "view3.png", (3, 0, 0))
    if meta:
        (d / "sample.json").write_text(json.dumps(meta))
    return d


def test_mtg_folder(tmp_path):
    _mtg_sample(tmp_path, "b", meta={"category": "robot", "edited_part": 2})
    _mtg_sample(tmp_path, "a", edited=(1,))
    ds = MTGFolderDataset(tmp_path)
    assert [s.id for s in ds] == ["a", "b"]
    a, b = ds[0], ds[1]
    assert a.sources == [MTG_SOURCE] and a.distractors[MTG_SOURCE][1] is None
    assert b.category == "robot" and b.meta["edited_part"] == 2
    loaded = b.load()
    assert pixel(loaded.views[1]) == (2, 0, 0) and pixel(loaded.distractors[MTG_SOURCE][0]) == (0, 1, 0)
    assert pixel(loaded.masks[0]) == (255,) and pixel(loaded.part_masks[1]) == (62,)
    assert loaded.part_masks[1].mode == "L"


def test_mtg_folder_errors(tmp_path):
    _mtg_sample(tmp_path / "three", "s", extra_view=True)
    with pytest.raises(DatasetError, match=r"has view3; MTG samples have exactly 2 views"):
        MTGFolderDataset(tmp_path / "three")[0]
    (tmp_path / "none" / "s").mkdir(parents=True)
    write_png(tmp_path / "none" / "s" / "edited1.png", (1, 1, 1))
    with pytest.raises(DatasetError, match=r"no view images"):
        MTGFolderDataset(tmp_path / "none")[0]
