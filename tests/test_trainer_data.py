"""Training examples: drawing, determinism, augmentation, refusals (on real folder datasets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_nearid.backbones import get_backbone_spec
from comfy_nearid.data.folder import FolderDataset
from comfy_nearid.errors import ConfigError, DatasetError
from trainer.config import AugmentConfig, DataConfig
from trainer.data import (
    AugmentParams,
    DatasetLayout,
    EpochSampler,
    SampleLayout,
    TrainingExamples,
    apply_augment,
    draw_example,
    example_rng,
    scan_layout,
    split_validation,
)

from _trainer_helpers import make_folder_dataset

torch.set_num_threads(1)


def _layout(views, distractors):
    return SampleLayout(index=0, id="s", views=views, distractors=distractors)


def test_draw_uses_the_protocol_slots():
    layout = _layout([0, 1, 2], {"a": [0, 1, 2], "b": [1]})
    for seed in range(20):
        draw = draw_example(layout, example_rng(seed, 0, 0), positives=2, negatives=3)
        anchor, p1, p2, n1, n2, n3 = draw.slots
        assert anchor.source is None and anchor.view in (0, 1, 2)
        # positives: exactly the other two views
        assert sorted([p1.view, p2.view]) == sorted({0, 1, 2} - {anchor.view})
        # distractors: one source, the anchor's own distractor first (same background)
        negs = [n for n in (n1, n2, n3) if n is not None]
        assert len({n.source for n in negs}) == 1
        assert negs[0].view == anchor.view or anchor.view not in layout.distractors[negs[0].source]
        assert len({n.view for n in negs}) == len(negs)


def test_draw_masks_missing_slots():
    layout = _layout([0, 2], {"a": [2]})
    draw = draw_example(layout, example_rng(0, 0, 0), positives=2, negatives=3)
    assert draw.valid == [True, True, False, True, False, False]
    no_distractor = draw_example(_layout([0, 1], {}), example_rng(0, 0, 0), 2, 3)
    assert no_distractor.valid == [True, True, False, False, False, False]


def test_all_sources_mode_pools_sources():
    layout = _layout([0, 1, 2], {"a": [0, 1, 2], "b": [0, 1, 2]})
    seen_sources = set()
    for seed in range(10):
        draw = draw_example(layout, example_rng(seed, 0, 0), 2, 3, distractor_mode="all_sources")
        anchor = draw.slots[0]
        negs = draw.slots[3:]
        assert all(n is not None for n in negs)
        assert negs[0].view == anchor.view  # an anchor-aligned distractor leads
        seen_sources |= {n.source for n in negs}
    assert seen_sources == {"a", "b"}


def test_anchor_is_random_but_reproducible_per_seed_and_epoch():
    def anchors(seed, epoch):
        return [draw_example(SampleLayout(i, "s", [0, 1, 2], {"a": [0, 1, 2]}), example_rng(seed, epoch, i), 2, 3).slots[0].view for i in range(60)]

    assert anchors(0, 0) == anchors(0, 0)
    assert anchors(0, 0) != anchors(0, 1)
    assert anchors(0, 0) != anchors(1, 0)
    counts = np.bincount(anchors(0, 0), minlength=3)
    assert counts.min() >= 10  # every view serves as anchor


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    s = EpochSampler(50, seed=3)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(p for _, p in first) == list(range(50))
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert [p for _, p in first] != [p for _, p in second]
    s.set_epoch(0)
    assert list(s) == first


def test_scan_layout_and_refusals(tmp_path):
    root = make_folder_dataset(tmp_path / "ok", n_samples=5, views_per_sample=[3, 1, 2, 3, 3])
    layout = scan_layout(FolderDataset(root))
    assert layout.ids == ["id0000", "id0002", "id0003", "id0004"]  # id0001 has one view
    assert layout.sources == ["object", "part"]
    assert layout.samples[1].views == [0, 1]

    only_one_view = make_folder_dataset(tmp_path / "one", n_samples=3, n_views=1)
    with pytest.raises(DatasetError, match="fewer than two valid views"):
        scan_layout(FolderDataset(only_one_view))

    no_distractors = make_folder_dataset(tmp_path / "nod", n_samples=3, distractors=False)
    with pytest.raises(DatasetError, match="no near-identity distractor"):
        scan_layout(FolderDataset(no_distractors))

    with pytest.raises(ConfigError, match=r"source\(s\) \['colour'\] do not occur .*found: \['object', 'part'\]"):
        scan_layout(FolderDataset(root), sources=["colour"])
    # a source that exists only as empty folders counts as absent
    with pytest.raises(ConfigError, match="do not occur"):
        scan_layout(FolderDataset(root, sources=["colour"]), sources=["colour"])


def test_validation_hold_out_is_disjoint_and_seeded(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_samples=10)
    layout = scan_layout(FolderDataset(root))
    train, val = split_validation(layout, 0.3, seed=1)
    assert len(val) == 3 and len(train) == 7
    assert not set(train.ids) & set(val.ids)
    assert split_validation(layout, 0.3, seed=1)[1].ids == val.ids
    with pytest.raises(ConfigError, match="val_fraction"):
        split_validation(layout, 0.01, seed=1)


def test_validation_by_category_holds_out_whole_categories():
    # 12 samples in 4 categories of 3; fraction 0.3 -> at least round(3.6) = 4 samples, i.e.
    # whole categories until 4 are reached: 2 categories, 6 samples
    samples = [SampleLayout(index=i, id=f"s{i}", views=[0, 1], distractors={"object": [0]}, category=f"c{i % 4}")
               for i in range(12)]
    layout = DatasetLayout(samples, ["object"], "toy")
    train, val = split_validation(layout, 0.3, seed=1, by="category")
    val_categories = {s.category for s in val.samples}
    assert len(val_categories) == 2 and len(val) == 6 and len(train) == 6
    assert not val_categories & {s.category for s in train.samples}
    assert split_validation(layout, 0.3, seed=1, by="category")[1].ids == val.ids
    assert "categories" in val.description
    one = DatasetLayout([SampleLayout(index=i, id=f"s{i}", views=[0, 1], distractors={}, category="c")
                         for i in range(4)], [], "one category")
    with pytest.raises(ConfigError, match="at least 2 categories"):
        split_validation(one, 0.3, seed=1, by="category")
    with pytest.raises(ConfigError, match="val_split_by"):
        split_validation(layout, 0.3, seed=1, by="colour")


def test_live_items_hold_the_slot_images(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_samples=4)
    ds = FolderDataset(root)
    layout = scan_layout(ds)
    spec = get_backbone_spec("tiny-siglip")
    data = DataConfig(format="folder", train=str(root), foreground_mask=True)
    examples = TrainingExamples(ds, layout, data, AugmentConfig(), seed=0, spec=spec)
    item = examples[(0, 2)]
    draw, _ = examples.draw(0, 2)
    sample = ds[layout.samples[2].index]
    assert item["pixels"].shape == (6, 3, 30, 30)
    assert item["valid"].tolist() == draw.valid
    for i, slot in enumerate(draw.slots):
        if slot is None:
            assert torch.all(item["pixels"][i] == 0)
            continue
        expected = spec.preprocess(slot.ref(sample).load())  # independent path: load + preprocess
        assert torch.equal(item["pixels"][i], expected)
    # foreground masking: the square covers a quarter of the image, so some tokens are dropped
    assert item["token_mask"].shape == (6, spec.num_tokens)
    assert 0 < item["token_mask"][0].sum() < spec.num_tokens


def test_augmentation_is_deterministic_and_moves_the_mask_with_the_image():
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[5:15, 5:15] = 255
    image = Image.fromarray(arr)
    mask = Image.fromarray((arr[..., 0] > 0).astype(np.uint8) * 255)
    flipped, fmask = apply_augment(image, mask, AugmentParams(flip=True))
    assert np.array_equal(np.asarray(flipped)[:, ::-1], arr)
    assert np.array_equal(np.asarray(fmask), np.asarray(flipped)[..., 0])
    # shift right by a quarter of the width: the square moves 10 pixels, mask with it
    moved, mmask = apply_augment(image, mask, AugmentParams(shift_x=0.25))
    expected = np.zeros_like(arr)
    expected[5:15, 15:25] = 255
    assert np.array_equal(np.asarray(moved), expected)
    assert np.array_equal(np.asarray(mmask), expected[..., 0])
    darker, _ = apply_augment(image, None, AugmentParams(brightness=0.5))
    assert np.asarray(darker).max() == 128 or np.asarray(darker).max() == 127


def test_augmented_items_are_reproducible(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_samples=4)
    ds = FolderDataset(root)
    layout = scan_layout(ds)
    spec = get_backbone_spec("tiny-siglip")
    aug = AugmentConfig(flip_prob=0.5, color_jitter_prob=0.5, translate_prob=0.5)
    data = DataConfig(format="folder", train=str(root))
    a = TrainingExamples(ds, layout, data, aug, seed=0, spec=spec)[(1, 3)]
    b = TrainingExamples(ds, layout, data, aug, seed=0, spec=spec)[(1, 3)]
    plain = TrainingExamples(ds, layout, data, AugmentConfig(), seed=0, spec=spec)[(1, 3)]
    assert torch.equal(a["pixels"], b["pixels"])
    assert not torch.equal(a["pixels"], plain["pixels"])
