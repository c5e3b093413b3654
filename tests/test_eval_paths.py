"""Model path vs CSV path, embed-once deduplication, MTG oracle, and empty/bad datasets."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _eval_helpers import write_tiny_dataset, write_tiny_mtg
from comfy_nearid.data.folder import FolderDataset
from comfy_nearid.data.mtg import MTGFolderDataset
from comfy_nearid.errors import DatasetError, InvalidInputError
from comfy_nearid.evaluate import (
    Scorer,
    csv_result,
    evaluate_dataset,
    feature_scorer,
    model_scorer,
    similarity_table,
)

PAIRS = ((0, 1), (0, 2), (1, 2))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds", n_samples=5, seed=3)


def _independent_csv(dataset: FolderDataset, embed_one, path: Path) -> Path:
    """Reference-format CSV built here: every slot embedded on its own, cosines by hand."""
    columns = ["id", "category", "source"] + [f"sim_{i}{j}" for i, j in PAIRS] + \
        [f"cross_{i}{j}" for i in range(3) for j in range(3)]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for sample in dataset:
            views = [None if v is None else embed_one(v.load(), m.load()) for v, m in zip(sample.views, sample.masks)]
            for source in sample.sources:
                dists = [None if d is None else embed_one(d.load(), m.load())
                         for d, m in zip(sample.distractors[source], sample.distractor_masks[source])]
                row = [sample.id, sample.category, source]
                for i, j in PAIRS:
                    row.append("" if views[i] is None or views[j] is None else repr(float(views[i] @ views[j])))
                for i in range(3):
                    for j in range(3):
                        row.append("" if views[i] is None or dists[j] is None else repr(float(views[i] @ dists[j])))
                w.writerow(row)
    return path


def test_csv_path_equals_model_path(tiny_dir, tmp_path):
    from comfy_nearid import load_model

    dataset = FolderDataset(tiny_dir)
    # batch_size=1 makes the model path's batches the same as the per-image embedding below;
    # masks make this random tiny model score in the middle (SSR 50 %, PA 65 %), not at 0
    scorer = model_scorer("mean:tiny-siglip", device="cpu", batch_size=1, pretrained=False, use_masks=True)
    [model_result] = evaluate_dataset([scorer], dataset, n_resamples=50, seed=3, progress=False)
    assert 0.0 < model_result.summary["ssr"] < 100.0

    model = load_model(backbone="tiny-siglip", readout="mean", pretrained=False, device="cpu", seed=0)

    def embed_one(image: Image.Image, mask: Image.Image) -> np.ndarray:
        e = model.embed([image], masks=[mask], batch_size=1)[0].double().numpy()
        return e / np.linalg.norm(e)

    csv_path = _independent_csv(dataset, embed_one, tmp_path / "ref.csv")
    csv_res = csv_result("mean:tiny-siglip", csv_path, n_resamples=50, seed=3)
    for key in ("ssr", "pa", "pa_reference", "n_samples", "n_trials", "by_source", "by_category", "ci95"):
        assert csv_res.summary[key] == model_result.summary[key], key
    np.testing.assert_allclose(csv_res.table.view_sims, model_result.table.view_sims, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(csv_res.table.cross_sims, model_result.table.cross_sims, atol=1e-12, equal_nan=True)


def _content_hashes(paths) -> set[str]:
    return {hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths}


def test_each_distinct_image_embedded_exactly_once(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", n_samples=3, seed=1)
    # a byte-identical copy in another slot must not be embedded again
    dup = root / "s001" / "colour" / "distractor2.png"
    dup.write_bytes((root / "s000" / "view1.png").read_bytes())
    (root / "s001" / "colour" / "mask2.png").write_bytes((root / "s000" / "mask1.png").read_bytes())
    seen: list[bytes] = []

    def counting_embed(images, masks):
        assert masks is None
        seen.extend(im.tobytes() for im in images)
        return np.stack([np.asarray(im, dtype=np.float64).reshape(-1)[:16] + 1.0 for im in images])

    table = similarity_table(FolderDataset(root), counting_embed, batch_size=4, progress=False)
    image_files = [p for p in root.rglob("*.png") if p.name.startswith(("view", "distractor"))]
    distinct = _content_hashes(image_files)
    assert len(seen) == len(distinct) == len(image_files) - 1
    assert len(set(seen)) == len(seen)
    assert table.info == {"n_images_embedded": len(distinct), "n_image_slots": len(image_files)}


def test_scorer_mask_use_dedupes_by_image_and_mask(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", n_samples=2, seed=2)
    calls: list[tuple[int, int]] = []

    def embed(images, masks):
        assert masks is not None and all(m is not None and m.mode == "L" for m in masks)
        calls.append((len(images), len(masks)))
        return np.stack([np.asarray(m, dtype=np.float64).reshape(-1)[::50] + 1.0 for m in masks])

    table = similarity_table(FolderDataset(root), Scorer("m", embed, use_masks=True, batch_size=5), progress=False)
    assert all(a == b for a, b in calls) and max(a for a, _ in calls) == 5
    # masks of a view and of its "colour" distractor are identical files -> identical embeddings
    np.testing.assert_allclose(np.diagonal(table.cross_sims[table.sources.index("colour")]), 1.0)


def test_mtg_oracle_and_mo_match_an_independent_computation(tmp_path):
    root = write_tiny_mtg(tmp_path / "mtg", n_samples=8, seed=4)
    [res] = evaluate_dataset([feature_scorer("object")], MTGFolderDataset(root), benchmark="mtg",
                             n_resamples=0, progress=False)
    for r, sample_id in enumerate(res.table.ids):
        for k in (1, 2):
            obj = np.asarray(Image.open(root / sample_id / f"object_mask{k}.png")) >= 128
            part = np.asarray(Image.open(root / sample_id / f"part_mask{k}.png")) >= 128
            assert res.table.oracle[r, k - 1] == pytest.approx(1 - part.sum() / obj.sum())
    c, o = res.table.cross_sims, res.table.oracle

    def r_(x, y):
        return float(np.corrcoef(x, y)[0, 1])

    rs = [r_(c[:, 0, 0], o[:, 0]), r_(c[:, 1, 1], o[:, 1]), r_(c[:, 0, 1], o[:, 1]), r_(c[:, 1, 0], o[:, 0])]
    z = [math.atanh(max(-0.999, min(0.999, r))) for r in rs]
    assert res.summary["mo"] == pytest.approx(math.tanh(sum(z) / 4))
    assert res.summary["mopair"] == pytest.approx(math.tanh(sum(z[:2]) / 2))
    # SSR with two views: margins s(1,2) - s(1,1p) and s(1,2) - s(2,2p)
    m = np.stack([c[:, 0, 0], c[:, 1, 1]], 1)
    wins = res.table.view_sims[:, 0, 1][:, None] - m > 0
    assert res.summary["ssr"] == pytest.approx(100 * wins.all(1).mean())
    assert res.summary["pa"] == pytest.approx(100 * wins.mean())


def test_empty_and_distractor_free_datasets_give_clear_messages(tmp_path):
    with pytest.raises(DatasetError, match="holds no samples"):
        similarity_table([], lambda ims, ms: np.ones((len(ims), 2)), progress=False)
    root = write_tiny_dataset(tmp_path / "ds", n_samples=2, seed=0)
    with pytest.raises(DatasetError, match="none of the 2 samples has a distractor from sources \\['nope'\\]"):
        similarity_table(FolderDataset(root), lambda ims, ms: np.ones((len(ims), 2)), sources=["nope"], progress=False)


def test_bad_embeddings_are_refused(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", n_samples=1, seed=0)
    with pytest.raises(InvalidInputError, match=r"\[N=\d+, D\]"):
        similarity_table(FolderDataset(root), lambda ims, ms: np.ones((len(ims) + 1, 2)), progress=False)
    with pytest.raises(InvalidInputError, match="view1.png is zero or not finite"):
        similarity_table(FolderDataset(root), lambda ims, ms: np.zeros((len(ims), 2)), progress=False)
    with pytest.raises(InvalidInputError, match="needs an object mask"):
        feature_scorer("object").embed_fn([Image.new("RGB", (4, 4))], None)
    with pytest.raises(InvalidInputError, match="scorer spec"):
        model_scorer("bogus:thing")
    with pytest.raises(InvalidInputError, match="unique"):
        evaluate_dataset([feature_scorer("object"), feature_scorer("object")], FolderDataset(root), progress=False)
