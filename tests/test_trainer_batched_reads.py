"""Whole-batch reads from the feature cache and the fused AdamW step: the same numbers as the
per-example path (one ``cache.read`` per example, stacked by ``default_collate``) and the
per-tensor AdamW loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from comfy_nearid import load_model
from comfy_nearid.data.folder import FolderDataset
from trainer.data import TrainingExamples, collate_examples, scan_layout
from trainer.feature_cache import FeatureCache, prepare_cache
from trainer.loop import train
from trainer.tracking import read_metrics

from _trainer_helpers import make_folder_dataset, tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def two_shard_cache(tmp_path_factory):
    """A cache of two shards over two datasets; the second has samples with 2 of 3 views, so
    some positive slots are masked (row -1)."""
    tmp = tmp_path_factory.mktemp("batched")
    first = make_folder_dataset(tmp / "a", n_samples=3, seed=1)
    second = make_folder_dataset(tmp / "b", n_samples=5, seed=2, views_per_sample=[3, 2, 3, 2, 3])
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=0)
    readers = [(FolderDataset(first), scan_layout(FolderDataset(first)))]
    prepare_cache(tmp / "cache", model, "float16", readers, progress=False)
    ds = FolderDataset(second)
    layout = scan_layout(ds)
    cache, (rows,) = prepare_cache(tmp / "cache", model, "float16", readers[:0] + [(ds, layout)], progress=False)
    assert len(cache.shards) == 2
    return tmp, model, ds, layout, cache, rows


def test_read_of_a_row_grid_equals_the_shard_files_row_by_row(two_shard_cache):
    tmp, _, _, _, cache, _ = two_shard_cache
    # the shards as plain arrays, indexed by hand (independent of FeatureCache.read)
    tokens = np.concatenate([np.load(tmp / "cache" / s["tokens"]) for s in cache.shards])
    masks = np.concatenate([np.load(tmp / "cache" / s["masks"]) for s in cache.shards])
    rng = np.random.default_rng(0)
    grid = rng.integers(-1, len(cache), size=(4, 6))
    grid[0, 0] = len(cache) - 1  # last row of the last shard
    grid[1, 2] = 0
    got_tokens, got_masks = cache.read(grid)
    assert got_tokens.shape == (4, 6, cache.identity.num_tokens, cache.identity.dim)
    assert got_tokens.dtype == torch.float16 and got_masks.dtype == torch.bool
    for (i, j), row in np.ndenumerate(grid):
        if row < 0:
            assert not got_tokens[i, j].any() and got_masks[i, j].all()
        else:
            assert np.array_equal(got_tokens[i, j].numpy(), tokens[row])
            assert np.array_equal(got_masks[i, j].numpy(), masks[row])


@pytest.mark.parametrize("foreground_mask", [False, True])
def test_getitems_equals_stacking_the_items(two_shard_cache, tmp_path, foreground_mask):
    _, model, ds, layout, cache, rows = two_shard_cache
    cfg = tiny_config(tmp_path, "unused", data__foreground_mask=foreground_mask)
    examples = TrainingExamples(ds, layout, cfg.data, cfg.augment, 0, model.spec, cached=(cache, rows))
    keys = [(1, 4), (1, 0), (1, 3), (1, 1), (1, 2)]
    batch = collate_examples(examples.__getitems__(keys))
    expected = default_collate([examples[k] for k in keys])
    assert set(batch) == set(expected)
    assert not expected["valid"].all(), "the case must hold masked slots"
    for name, value in expected.items():
        assert batch[name].dtype == value.dtype and torch.equal(batch[name], value), name


def test_live_items_are_stacked_by_the_collate_function(two_shard_cache, tmp_path):
    _, model, ds, layout, _, _ = two_shard_cache
    cfg = tiny_config(tmp_path, "unused")
    examples = TrainingExamples(ds, layout, cfg.data, cfg.augment, 0, model.spec)
    keys = [(0, 2), (0, 1)]
    batch = collate_examples(examples.__getitems__(keys))
    assert torch.equal(batch["pixels"], torch.stack([examples[k]["pixels"] for k in keys]))


def _losses(run_dir) -> list[float]:
    (path,) = run_dir.rglob("metrics.csv")
    return [value for _, name, value in read_metrics(path) if name == "train/loss"]


@pytest.mark.slow
def test_training_from_the_cache_equals_the_per_example_path_and_adamw_loop(tmp_path, monkeypatch):
    """Batched reads + fused AdamW (the loop's path) against per-example reads + the
    per-tensor AdamW loop (the former path): same loss trajectory and head weights."""
    from safetensors.torch import load_file

    import trainer.loop as loop

    root = make_folder_dataset(tmp_path / "data", n_samples=10, views_per_sample=[3, 2] * 5)
    results = {}
    for form in ("former", "batched"):
        if form == "former":
            monkeypatch.setattr(TrainingExamples, "__getitems__", None)  # the DataLoader reads item by item
            monkeypatch.setattr(
                loop, "make_optimizer",
                lambda params, o, device: torch.optim.AdamW(
                    params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, foreach=False
                ),
            )
        else:
            monkeypatch.undo()
        cfg = tiny_config(tmp_path / form, root, features__cache=True, features__dtype="float16", train__epochs=3)
        result = train(cfg)
        results[form] = (load_file(result.last_head_path), _losses(tmp_path / form), result.global_step)
    (head_a, losses_a, steps_a), (head_b, losses_b, steps_b) = results["former"], results["batched"]
    assert steps_a == steps_b == 3 * (10 // 4)
    assert len(losses_a) == steps_a and len(losses_b) == steps_b
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-6, atol=0)
    for key in head_a:
        torch.testing.assert_close(head_b[key], head_a[key], rtol=0, atol=1e-6)
