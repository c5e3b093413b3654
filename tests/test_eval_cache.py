"""The evaluator through the shared embedding cache: a re-evaluation runs no forward pass and
gives the same numbers; masks are part of the key; another model never reads the entries;
the CLI's ``--cache``; several processes filling one cache file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from _eval_helpers import write_tiny_dataset
from _processes import accelerate_launch
from comfy_nearid import load_model
from comfy_nearid.cli import main
from comfy_nearid.data.folder import FolderDataset
from comfy_nearid.embedding_cache import EmbeddingCache, image_cache_keys, model_cache_identity
from comfy_nearid.evaluate import embedding_scorer, evaluate_dataset
from comfy_nearid.model import IdentityModel


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list:
    root = write_tiny_dataset(tmp_path_factory.mktemp("evalcache") / "ds", n_samples=3, seed=11)
    dataset = FolderDataset(root)
    return [dataset[i] for i in range(len(dataset))]


def _counted_model(seed: int, readout: str = "mean") -> tuple[IdentityModel, list[int]]:
    """A real tiny model whose forward passes are counted: ``counts`` gets the batch size of
    every ``embed_pixels`` call (the one place every embedding is computed)."""
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=seed,
                       readout=readout)
    counts: list[int] = []
    original = model.embed_pixels

    def counting(pixels, *args, **kwargs):
        counts.append(int(pixels.shape[0]))
        return original(pixels, *args, **kwargs)

    model.embed_pixels = counting  # instance attribute: only this model is counted
    return model, counts


def _evaluate(model, samples, cache, use_masks=False):
    scorer = embedding_scorer(model, name="m", batch_size=5, use_masks=use_masks, cache=cache)
    return evaluate_dataset([scorer], samples, n_resamples=20, progress=False)[0]


def _distinct_images(samples, use_masks: bool) -> int:
    """Distinct (image, mask) pairs of the dataset, counted here from the files themselves."""
    keys = set()
    for s in samples:
        for view, mask in zip(s.views, s.masks):
            keys.add((view.key, mask.key if use_masks else None))
        for source, dists in s.distractors.items():
            dmasks = s.distractor_masks.get(source, [])
            for k, d in enumerate(dists):
                m = dmasks[k] if k < len(dmasks) and dmasks[k] is not None else s.masks[k]
                keys.add((d.key, m.key if use_masks else None))
    return len(keys)


def test_second_evaluation_runs_no_forward_and_gives_identical_numbers(samples, tmp_path):
    model, counts = _counted_model(seed=0)
    uncached = _evaluate(model, samples, None)
    n_distinct = _distinct_images(samples, use_masks=False)
    assert sum(counts) == n_distinct
    counts.clear()
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        first = _evaluate(model, samples, cache)
        assert sum(counts) == n_distinct  # an empty cache: everything computed once
        assert cache.count() == n_distinct
        counts.clear()
        second = _evaluate(model, samples, cache)
    assert counts == []  # not a single forward pass
    for name in ("view_sims", "cross_sims", "distractor_sims"):
        np.testing.assert_array_equal(getattr(first.table, name), getattr(second.table, name))
        np.testing.assert_allclose(getattr(first.table, name), getattr(uncached.table, name), atol=1e-6)
    assert json.dumps(first.summary, sort_keys=True) == json.dumps(second.summary, sort_keys=True)
    assert first.config["cache"] == str(tmp_path / "cache.sqlite")


def test_masks_are_part_of_the_key(samples, tmp_path):
    model, counts = _counted_model(seed=0)
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        plain = _evaluate(model, samples, cache, use_masks=False)
        counts.clear()
        masked = _evaluate(model, samples, cache, use_masks=True)
        # the unmasked entries of the same pixels are not reused for masked embeddings
        assert sum(counts) == _distinct_images(samples, use_masks=True)
        counts.clear()
        again = _evaluate(model, samples, cache, use_masks=True)
        assert counts == []
    np.testing.assert_array_equal(masked.table.cross_sims, again.table.cross_sims)
    assert not np.allclose(masked.table.cross_sims, plain.table.cross_sims, equal_nan=True)
    # a masked cosine worked out directly with the model
    s = samples[0]
    direct = model.embed([s.views[0].load(), s.views[1].load()], masks=[s.masks[0].load(), s.masks[1].load()]).numpy()
    row = masked.table.ids.index(s.id)
    assert masked.table.view_sims[row, 0, 1] == pytest.approx(float(direct[0] @ direct[1]), abs=1e-5)


def test_another_model_never_reads_the_first_models_entries(samples, tmp_path):
    first, first_counts = _counted_model(seed=0)
    other, other_counts = _counted_model(seed=1)
    n_distinct = _distinct_images(samples, use_masks=False)
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        a = _evaluate(first, samples, cache)
        b = _evaluate(other, samples, cache)
        assert sum(first_counts) == n_distinct
        assert sum(other_counts) == n_distinct  # every image recomputed by the other model
        assert sorted(cache.model_identities()) == sorted([first.identity, other.identity])
        assert cache.count(first.identity) == cache.count(other.identity) == n_distinct
    assert not np.allclose(a.table.cross_sims, b.table.cross_sims, equal_nan=True)
    uncached_other = _evaluate(other, samples, None)
    np.testing.assert_allclose(b.table.cross_sims, uncached_other.table.cross_sims, atol=1e-6)


def _count_forwards(monkeypatch) -> list[int]:
    """Count every forward pass of any IdentityModel (the CLI builds its own)."""
    counts: list[int] = []
    original = IdentityModel.embed_pixels

    def counting(self, pixels, *args, **kwargs):
        counts.append(int(pixels.shape[0]))
        return original(self, pixels, *args, **kwargs)

    monkeypatch.setattr(IdentityModel, "embed_pixels", counting)
    return counts


def test_cli_cache_flag_reuses_embeddings(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "ds", n_samples=2, seed=3)
    counts = _count_forwards(monkeypatch)
    monkeypatch.setenv("NEARID_EMBEDDING_CACHE", str(tmp_path / "env" / "cache.sqlite"))
    base = ["eval", "ssr", "--data", str(root), "--scorer", "mean:tiny-siglip", "--scorer", "feature:object",
            "--random-weights", "--device", "cpu", "--bootstrap", "20", "--no-progress", "--cache"]
    assert main(base + ["--out", str(tmp_path / "one")]) == 0  # --cache without a value: the default file
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    n_embedded = summary_one["mean:tiny-siglip"]["n_images_embedded"]
    assert sum(counts) == n_embedded
    with EmbeddingCache(tmp_path / "env" / "cache.sqlite", readonly=True) as cache:
        assert cache.count() == n_embedded  # feature scorers are not cached
    counts.clear()
    assert main(base + ["--out", str(tmp_path / "two")]) == 0
    assert counts == []
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary_one == summary_two
    assert (tmp_path / "one" / "mean_tiny-siglip.samples.csv").read_text() == \
        (tmp_path / "two" / "mean_tiny-siglip.samples.csv").read_text()
    config = json.loads((tmp_path / "two" / "eval_config.json").read_text())
    assert config["scorers"]["mean:tiny-siglip"]["cache"] == str(tmp_path / "env" / "cache.sqlite")
    # without --cache nothing is read: every image is embedded again
    counts.clear()
    assert main(base[:-1] + ["--out", str(tmp_path / "three")]) == 0
    assert sum(counts) == n_embedded


@pytest.mark.slow
def test_two_processes_fill_one_cache_file(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU, both processes writing their
    share into the same SQLite file; a one-process re-run then finds every embedding."""
    pytest.importorskip("accelerate")
    root = write_tiny_dataset(tmp_path / "ds", n_samples=3, seed=4)
    cache_path = tmp_path / "cache.sqlite"
    base = ["eval", "ssr", "--data", str(root), "--scorer", "mean:tiny-siglip", "--random-weights",
            "--device", "cpu", "--bootstrap", "20", "--no-progress", "--cache", str(cache_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = accelerate_launch(["-m", "comfy_nearid", *base, "--out", str(tmp_path / "two")], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0/2 embeds" in proc.stderr and "process 1/2 embeds" in proc.stderr
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["mean:tiny-siglip"]
    with EmbeddingCache(cache_path, readonly=True) as cache:
        assert cache.count() == two["n_images_embedded"]
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", readout="mean")
    with EmbeddingCache(cache_path, readonly=True) as cache:
        samples = [FolderDataset(root)[i] for i in range(3)]
        refs = [ref for s in samples for ref in s.views]
        _, keys, _ = image_cache_keys([r.load() for r in refs])
        stored = cache.get_many(model_cache_identity(model), keys)
    assert len(stored) == len(set(keys))  # both processes' shares are there, under the CLI model's identity
    direct = model.embed([r.load() for r in refs]).numpy()
    np.testing.assert_allclose(np.stack([stored[k] for k in keys]), direct, atol=1e-5)
