"""The sample contract: lazy image refs, alignment, loading, and skipping corrupt samples."""

from __future__ import annotations

import hashlib
import logging
import pickle

import pytest

from comfy_nearid.data import (
    BytesImageRef,
    FileImageRef,
    Sample,
    SampleLoadError,
    SkipReport,
    iter_loaded_samples,
)
from comfy_nearid.errors import DatasetError, ImageLoadError, InvalidInputError

from _data_helpers import pixel, png_bytes, write_png


def test_file_ref_loads_rgb_and_keys_by_content(tmp_path):
    p = write_png(tmp_path / "a.png", (1, 2, 3))
    copy = tmp_path / "b.png"
    copy.write_bytes(p.read_bytes())
    ref = FileImageRef(p)
    img = ref.load()
    assert img.mode == "RGB" and img.size == (6, 4) and pixel(img) == (1, 2, 3)
    assert ref.key == hashlib.sha1(p.read_bytes()).hexdigest()
    assert FileImageRef(copy).key == ref.key  # same bytes, same key, wherever the file is
    assert ref.path == str(p) and ref.describe() == str(p)


def test_mask_refs_load_as_L(tmp_path):
    p = write_png(tmp_path / "m.png", (200, 200, 200))  # an RGB file used as a mask
    img = FileImageRef(p, mode="L").load()
    assert img.mode == "L" and pixel(img) == (200,)
    b = BytesImageRef(png_bytes(77, mode="L"), "table row 3 column masks1", mode="L")
    assert b.load().mode == "L" and pixel(b.load()) == (77,)
    assert b.path is None
    with pytest.raises(InvalidInputError, match="mode"):
        FileImageRef(p, mode="RGBA")  # type: ignore[arg-type]


def test_bytes_ref_errors_name_the_cell():
    ref = BytesImageRef(b"not a png", "pos.parquet row 4 (id x) column img2")
    with pytest.raises(ImageLoadError, match=r"row 4 \(id x\) column img2"):
        ref.load()
    with pytest.raises(ImageLoadError, match="empty"):
        BytesImageRef(b"", "cell").load()
    assert ref.key == hashlib.sha1(b"not a png").hexdigest()


def test_missing_file_ref(tmp_path):
    with pytest.raises(ImageLoadError, match="does not exist"):
        FileImageRef(tmp_path / "nope.png").load()
    with pytest.raises(ImageLoadError, match="nope.png"):
        FileImageRef(tmp_path / "nope.png", mode="L").load()
    with pytest.raises(ImageLoadError, match="nope.png"):
        _ = FileImageRef(tmp_path / "nope.png").key


def _sample(tmp_path, sid="s1", corrupt_slot=None):
    refs = {}
    for name, colour in [("view1", (1, 1, 1)), ("view3", (3, 3, 3)), ("d1", (11, 0, 0)), ("d3", (13, 0, 0))]:
        refs[name] = FileImageRef(write_png(tmp_path / sid / f"{name}.png", colour))
    if corrupt_slot:
        (tmp_path / sid / f"{corrupt_slot}.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return Sample(
        id=sid,
        category="c",
        views=[refs["view1"], None, refs["view3"]],
        distractors={"src": [refs["d1"], None, refs["d3"]], "empty": [None]},
    )


def test_sample_pads_lists_and_reports_valid_views(tmp_path):
    s = _sample(tmp_path)
    assert s.valid_views() == [0, 2]
    assert s.sources == ["empty", "src"]
    assert s.distractors["empty"] == [None, None, None]
    assert s.masks == [None, None, None] and s.part_masks == [None, None, None]
    assert s.distractor("src", 2) is s.distractors["src"][2]
    assert s.distractor("other", 0) is None
    assert [slot for slot, _ in s.refs()] == ["view1", "view3", "src/distractor1", "src/distractor3"]
    loaded = s.load()
    assert [pixel(v) if v else None for v in loaded.views] == [(1, 1, 1), None, (3, 3, 3)]
    assert pixel(loaded.distractors["src"][2]) == (13, 0, 0)
    assert loaded.id == "s1" and loaded.category == "c"


def test_sample_rejects_lists_longer_than_views():
    with pytest.raises(InvalidInputError, match=r"sample 'x'.*distractors\['a'\] has 2 entries.*1 view"):
        Sample(id="x", category="c", views=[None], distractors={"a": [None, None]})


def test_sample_load_error_names_id_and_slot(tmp_path):
    s = _sample(tmp_path, corrupt_slot="d3")
    with pytest.raises(SampleLoadError) as info:
        s.load()
    assert info.value.sample_id == "s1" and info.value.slot == "src/distractor3"
    assert "d3.png" in str(info.value) and isinstance(info.value, DatasetError)


def test_iter_loaded_samples_skips_and_reports(tmp_path, caplog):
    samples = [_sample(tmp_path, "a"), _sample(tmp_path, "b", corrupt_slot="view3"), _sample(tmp_path, "c")]
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="comfy_nearid.data.sample"):
        ids = [ls.id for ls in iter_loaded_samples(samples, report=report)]
    assert ids == ["a", "c"]
    assert report.count == 1 and report.loaded == 2
    skipped = report.skipped[0]
    assert (skipped.index, skipped.sample_id, skipped.slot) == (1, "b", "view3")
    assert "view3.png" in skipped.reason
    text = caplog.text
    assert "'b'" in text and "view3" in text and "1 skipped" in text
    assert report.to_dict()["skipped"][0]["slot"] == "view3"


def test_iter_loaded_samples_raise_mode(tmp_path):
    samples = [_sample(tmp_path, "a", corrupt_slot="view1")]
    with pytest.raises(SampleLoadError, match=r"sample 'a', slot view1"):
        list(iter_loaded_samples(samples, on_error="raise"))
    with pytest.raises(InvalidInputError, match="on_error"):
        list(iter_loaded_samples(samples, on_error="ignore"))  # type: ignore[arg-type]


def test_refs_pickle(tmp_path):
    ref = FileImageRef(write_png(tmp_path / "a.png", (5, 6, 7)), mode="L")
    back = pickle.loads(pickle.dumps(ref))
    assert back == ref and back.mode == "L"
    b = pickle.loads(pickle.dumps(BytesImageRef(png_bytes((1, 2, 3)), "cell")))
    assert pixel(b.load()) == (1, 2, 3)
