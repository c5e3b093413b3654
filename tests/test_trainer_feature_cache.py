"""The frozen-feature cache: contents, identity refusal, extension, and equivalence with
training through the backbone."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from comfy_nearid import load_model
from comfy_nearid.data.folder import FolderDataset
from comfy_nearid.errors import ConfigError
from trainer.data import ImageSlot, scan_layout
from trainer.feature_cache import FeatureCache, prepare_cache
from trainer.loop import train

from _trainer_helpers import make_folder_dataset, tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("cache-data"), n_samples=6)


def _model(seed=0):
    return load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=seed)


def _reader(root):
    ds = FolderDataset(root)
    return ds, scan_layout(ds)


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for one test (the module runs on 1), restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# threads 1: decode threads beside the backbone; 2: one batch per core (batches_on_cores)
@pytest.mark.parametrize("dtype,threads", [("float32", 1), ("float16", 1), ("float32", 2), ("float16", 2)])
def test_cache_rows_hold_each_images_backbone_tokens(tmp_path, dataset_root, dtype, threads, torch_threads):
    model = _model()
    ds, layout = _reader(dataset_root)
    torch_threads(threads)
    cache, (rows,) = prepare_cache(tmp_path / "c", model, dtype, [(ds, layout)], batch_size=5, progress=False)
    assert torch.get_num_threads() == threads  # the per-core build gives torch its threads back
    sample = ds[layout.samples[3].index]
    for slot in (ImageSlot(0), ImageSlot(2), ImageSlot(1, "part")):
        ref = slot.ref(sample)
        row = rows(layout.samples[3].index, slot)
        # Keyed by the file's content hash (computed here independently).
        assert cache.keys[row] == hashlib.sha1(open(ref.path, "rb").read()).hexdigest()
        # The row holds the tokens of that one image, embedded on its own here.
        expected = model.tokens(model.preprocess.batch([ref.load()]))[0]
        tokens, masks = cache.read([row])
        if dtype == "float32":
            torch.testing.assert_close(tokens[0], expected, rtol=1e-5, atol=1e-5)
        else:
            assert tokens.dtype == torch.float16
            torch.testing.assert_close(tokens[0].float(), expected.half().float(), rtol=2e-3, atol=2e-3)
        # token mask: the object square covers part of the image
        assert 0 < masks[0].sum() < model.spec.num_tokens
    # masked slot (-1): zeros and a full mask
    tokens, masks = cache.read([-1])
    assert torch.all(tokens == 0) and torch.all(masks)
    # 6 samples x (3 views + 2 sources x 3 distractors) distinct images
    assert len(cache) == 6 * 9


def test_cache_from_another_backbone_or_precision_is_refused(tmp_path, dataset_root):
    ds, layout = _reader(dataset_root)
    prepare_cache(tmp_path / "c", _model(seed=0), "float16", [(ds, layout)], progress=False)
    with pytest.raises(ConfigError, match=r"another backbone or preprocessing \(weights: cache has '[0-9a-f]{16}', run needs '[0-9a-f]{16}'\)"):
        prepare_cache(tmp_path / "c", _model(seed=1), "float16", [(ds, layout)], progress=False)
    with pytest.raises(ConfigError, match="dtype: cache has 'float16', run needs 'float32'"):
        prepare_cache(tmp_path / "c", _model(seed=0), "float32", [(ds, layout)], progress=False)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["identity"]["backbone"] == "tiny-siglip"
    assert index["identity"]["preprocess"].startswith("resize30-bicubic")


def test_cache_grows_by_a_shard_and_keeps_existing_rows(tmp_path):
    small = make_folder_dataset(tmp_path / "a", n_samples=3, seed=1)
    more = make_folder_dataset(tmp_path / "b", n_samples=4, seed=2)
    model = _model()
    cache1, _ = prepare_cache(tmp_path / "c", model, "float32", [_reader(small)], progress=False)
    first_shard = (tmp_path / "c" / "tokens-00000.npy").read_bytes()
    cache2, (rows_a, rows_b) = prepare_cache(tmp_path / "c", model, "float32", [_reader(small), _reader(more)], progress=False)
    assert len(cache2.shards) == 2 and len(cache2) == len(cache1) + 4 * 9
    assert (tmp_path / "c" / "tokens-00000.npy").read_bytes() == first_shard
    assert cache2.keys[: len(cache1)] == cache1.keys
    # opening again with nothing new adds nothing
    cache3, _ = prepare_cache(tmp_path / "c", model, "float32", [_reader(more)], progress=False)
    assert len(cache3.shards) == 2


def test_cache_size_limit(tmp_path, dataset_root):
    with pytest.raises(ConfigError, match="features.max_cache_gb"):
        prepare_cache(tmp_path / "c", _model(), "float16", [_reader(dataset_root)], max_gb=1e-9, progress=False)
    assert FeatureCache.open(tmp_path / "c") is None


@pytest.mark.slow
def test_training_from_the_cache_equals_training_through_the_backbone(tmp_path, dataset_root):
    heads = {}
    losses = {}
    for cache in (False, True):
        cfg = tiny_config(tmp_path / f"cache{cache}", dataset_root, features__cache=cache, train__epochs=2)
        result = train(cfg)
        from safetensors.torch import load_file

        heads[cache] = load_file(result.last_head_path)
        losses[cache] = result.final_loss
        assert result.global_step == 2 * (6 // 4)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for key in heads[True]:
        torch.testing.assert_close(heads[True][key], heads[False][key], rtol=0, atol=1e-6)
