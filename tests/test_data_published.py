"""PublishedNearIDDataset on tables the tests write: parquet shards, save_to_disk, DatasetDict."""

from __future__ import annotations

import json
import pickle

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from comfy_nearid.data import (  # noqa: E402
    PublishedMTGDataset,
    PublishedNearIDDataset,
    SkipReport,
    hub_snapshot,
    iter_loaded_samples,
    load_split_indices,
)
from comfy_nearid.errors import DatasetError  # noqa: E402

from _data_helpers import (  # noqa: E402
    distractor_colour,
    distractor_rows,
    image_struct,
    pixel,
    png_bytes,
    positives_rows,
    view_colour,
    write_parquet_shards,
    write_png,
)

N = 7


@pytest.fixture
def shards(tmp_path):
    """Positives with view 2 of row 3 missing, two distractor sets (one without masks)."""
    pos = write_parquet_shards(tmp_path / "pos", positives_rows(N, missing={3: [2]}), shards=3, row_group_size=2)
    flux = write_parquet_shards(tmp_path / "flux", distractor_rows(N, 0, missing={5: [3]}), shards=2, row_group_size=3)
    sdxl = write_parquet_shards(tmp_path / "sdxl", distractor_rows(N, 1, with_masks=False), shards=1, row_group_size=4)
    return pos, {"flux": flux, "sdxl": sdxl}


def _check_content(ds, n=N):
    assert len(ds) == n
    assert [s.id for s in ds] == [f"id{i:03d}" for i in range(n)]
    for i, s in enumerate(ds):
        assert s.category == f"cat{i % 2}"
        assert s.meta["category_description"] == f"things of kind {i % 2}"
        loaded = s.load()
        for k in (1, 2, 3):
            if loaded.views[k - 1] is not None:
                assert pixel(loaded.views[k - 1]) == view_colour(i, k)
        assert pixel(loaded.distractors["sdxl"][0]) == distractor_colour(i, 1, 1)


def test_parquet_shards_rows_in_order(shards):
    pos, distractors = shards
    ds = PublishedNearIDDataset(pos, distractors)
    _check_content(ds)
    assert ds.sources == ["flux", "sdxl"]
    s3 = ds[3]
    assert s3.valid_views() == [0, 2] and s3.views[1] is None
    s5 = ds[5]
    assert s5.distractors["flux"][2] is None and s5.distractors["flux"][1] is not None
    assert s5.distractor_masks["flux"][0].load().mode == "L"
    assert pixel(s5.distractor_masks["flux"][0].load()) == (200,)
    assert s5.distractor_masks["sdxl"] == [None, None, None]
    assert "row 5 (id id005) column nimg1" in s5.distractors["flux"][0].describe()
    # random access out of order crosses shards and row groups
    assert [ds[i].id for i in (6, 0, 4, 1)] == ["id006", "id000", "id004", "id001"]


def test_raw_bytes_and_path_cells(tmp_path):
    rows = positives_rows(3)
    for r in rows:
        r["img1"] = r["img1"]["bytes"]  # raw binary column
    img = write_png(tmp_path / "pos" / "images" / "v2.png", (9, 8, 7))
    rows[1]["img2"] = image_struct(None, "images/v2.png")  # bytes-less cell pointing at a file
    pos = tmp_path / "pos" / "one.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pos)
    ds = PublishedNearIDDataset(pos)
    assert pixel(ds[0].views[0].load()) == view_colour(0, 1)
    assert ds[1].views[1].path == str(img) and pixel(ds[1].views[1].load()) == (9, 8, 7)
    assert ds[0].sources == []


def test_save_to_disk_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "id": datasets.Value("string"), "category": datasets.Value("string"),
        "category_description": datasets.Value("string"), "n_images": datasets.Value("int32"),
        **{f"img{k}": datasets.Image() for k in (1, 2, 3)},
    })
    pos = datasets.Dataset.from_list(positives_rows(N, missing={3: [2]}), features=features)
    pos.save_to_disk(str(tmp_path / "pos"), num_shards=3)  # several arrow shards
    dfeatures = datasets.Features({"id": datasets.Value("string"),
                                   **{f"nimg{k}": datasets.Image() for k in (1, 2, 3)},
                                   **{f"masks{k}": datasets.Image() for k in (1, 2, 3)}})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(distractor_rows(N, 1), features=dfeatures)}).save_to_disk(
        str(tmp_path / "sdxl"))
    assert len(list((tmp_path / "pos").glob("*.arrow"))) > 1
    ds = PublishedNearIDDataset(tmp_path / "pos", {"sdxl": tmp_path / "sdxl"})
    _check_content(ds)
    assert ds[3].views[1] is None
    with pytest.raises(DatasetError, match=r"split 'test' not in .*splits: \['train'\]"):
        PublishedNearIDDataset(tmp_path / "pos", {"sdxl": tmp_path / "sdxl"}, split="test")
    # picklable for DataLoader workers, and reads the same after unpickling
    back = pickle.loads(pickle.dumps(ds))
    assert back[4].id == "id004" and pixel(back[4].views[2].load()) == view_colour(4, 3)


def test_misaligned_ids_name_both(tmp_path, shards):
    pos, distractors = shards
    ids = [f"id{i:03d}" for i in range(N)]
    ids[4] = "zzz"
    bad = write_parquet_shards(tmp_path / "bad", distractor_rows(N, 0, ids=ids), shards=1)
    with pytest.raises(DatasetError, match=r"row 4: positives .* have id 'id004' but distractor dataset bad .* has id 'zzz'"):
        PublishedNearIDDataset(pos, {"bad": bad})
    short = write_parquet_shards(tmp_path / "short", distractor_rows(N - 1, 0), shards=1)
    with pytest.raises(DatasetError, match=r"has 6 rows but the positives .* have 7"):
        PublishedNearIDDataset(pos, {"short": short})


def test_duplicate_positive_ids(tmp_path):
    pos = write_parquet_shards(tmp_path / "pos", positives_rows(3, ids=["a", "b", "a"]), shards=1)
    with pytest.raises(DatasetError, match=r"id 'a' appears at rows 0 and 2"):
        PublishedNearIDDataset(pos)


def test_columns_that_do_not_match(tmp_path, shards):
    pos, _ = shards
    rows = [{"identifier": "x", "image": image_struct(png_bytes((1, 1, 1)))}]
    wrong = write_parquet_shards(tmp_path / "wrong", rows, shards=1)
    with pytest.raises(DatasetError) as info:
        PublishedNearIDDataset(wrong)
    msg = str(info.value)
    assert "missing ['id', 'img1']" in msg and "found columns ['identifier', 'image']" in msg
    assert "expected ['id', 'img1']" in msg
    bad_d = write_parquet_shards(tmp_path / "bad_d", [{"id": f"id{i:03d}", "img1": None} for i in range(N)], shards=1)
    with pytest.raises(DatasetError, match=r"distractor \(flux\) dataset .*missing \['nimg1'\].*found columns \['id', 'img1'\]"):
        PublishedNearIDDataset(pos, {"flux": bad_d})


def test_shards_with_different_columns(tmp_path):
    data = tmp_path / "pos" / "data"
    data.mkdir(parents=True)
    rows = positives_rows(2)
    pq.write_table(pa.Table.from_pylist(rows[:1]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in rows[1].items() if k != "img3"}]),
                   data / "train-00001-of-00002.parquet")
    with pytest.raises(DatasetError, match=r"shard .*train-00001-of-00002.parquet has columns .* unlike the first"):
        PublishedNearIDDataset(tmp_path / "pos")


def test_not_a_dataset(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="neither a save_to_disk folder"):
        PublishedNearIDDataset(tmp_path / "x")
    with pytest.raises(DatasetError, match="does not exist"):
        PublishedNearIDDataset(tmp_path / "nothing")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match="cannot read"):
        PublishedNearIDDataset(tmp_path / "broken.parquet")


def test_split_selection_of_sharded_folder(tmp_path):
    folder = tmp_path / "pos"
    write_parquet_shards(folder, positives_rows(4), shards=1, prefix="train")
    write_parquet_shards(folder, positives_rows(2), shards=1, prefix="test")
    assert len(PublishedNearIDDataset(folder, split="test")) == 2
    assert len(PublishedNearIDDataset(folder, split="train")) == 4


def test_index_files(tmp_path, shards):
    pos, distractors = shards
    f = tmp_path / "test.json"
    f.write_text(json.dumps({"indices": [5, 1]}))
    ds = PublishedNearIDDataset(pos, distractors, indices=f)
    assert [s.id for s in ds] == ["id005", "id001"]
    f.write_text(json.dumps([6]))
    assert [s.id for s in PublishedNearIDDataset(pos, indices=f)] == ["id006"]
    cases = {
        "dup": ([1, 2, 1], r"row 1 appears twice \(entries 0 and 2\)"),
        "range": ([0, 7], r"entry 1 is 7, out of range for a dataset of 7 rows \(allowed 0..6\)"),
        "negative": ([-1], r"entry 0 is -1, out of range"),
        "float": ([1.0], r"entry 0 is 1.0; row numbers must be integers"),
        "bool": ([True], r"entry 0 is True"),
        "object": ({"rows": [1]}, r"must have an 'indices' key, found keys \['rows'\]"),
        "scalar": (3, r"expected a list of row numbers"),
    }
    for name, (value, pattern) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(value))
        with pytest.raises(DatasetError, match=pattern):
            PublishedNearIDDataset(pos, indices=p)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(DatasetError, match=r"bad.json is not valid JSON"):
        load_split_indices(bad, 10)
    with pytest.raises(DatasetError, match=r"missing.json does not exist"):
        load_split_indices(tmp_path / "missing.json", 10)
    with pytest.raises(DatasetError, match=r"<indices argument>: row 0 appears twice"):
        load_split_indices([0, 0], 10)


def test_corrupt_cell_is_skipped_with_id_and_slot(tmp_path):
    rows = positives_rows(3)
    rows[1]["img3"] = image_struct(b"\x89PNG broken")
    pos = write_parquet_shards(tmp_path / "pos", rows, shards=1)
    report = SkipReport()
    ids = [s.id for s in iter_loaded_samples(PublishedNearIDDataset(pos), report=report)]
    assert ids == ["id000", "id002"]
    (skipped,) = report.skipped
    assert (skipped.sample_id, skipped.slot) == ("id001", "view3")
    assert "row 1 (id id001) column img3" in skipped.reason


def test_published_mtg(tmp_path):
    rows = []
    for i in range(3):
        row = {}
        for k in (1, 2):
            row[f"image_{k}_original"] = image_struct(png_bytes(view_colour(i, k)))
            row[f"image_{k}_inpainted"] = image_struct(png_bytes(distractor_colour(i, k, 0)))
            row[f"image_{k}_object_mask"] = image_struct(png_bytes(255, mode="L"))
            row[f"image_{k}_part_mask"] = image_struct(png_bytes(40, mode="L"))
        rows.append(row)
    path = write_parquet_shards(tmp_path / "mtg", rows, shards=2, row_group_size=1)
    ds = PublishedMTGDataset(path)
    assert [s.id for s in ds] == ["00000", "00001", "00002"]
    s = ds[2].load()
    assert pixel(s.views[1]) == view_colour(2, 2)
    assert pixel(s.distractors["mtg"][0]) == distractor_colour(2, 1, 0)
    assert pixel(s.part_masks[1]) == (40,) and pixel(s.masks[0]) == (255,)
    wrong = write_parquet_shards(tmp_path / "wrong", [{"img": None}], shards=1)
    with pytest.raises(DatasetError, match=r"MTG dataset .* missing \['image_1_original'"):
        PublishedMTGDataset(wrong)


def test_hub_snapshot_refuses_to_download(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match=r"'someone/not-cached' is not in the local Hugging Face cache"):
        hub_snapshot("someone/not-cached", cache_dir=tmp_path)
