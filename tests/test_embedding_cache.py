"""Embedding cache: exact round trips, one namespace per model identity, content keys,
concurrent readers in real processes, and cached embedding equal to the model's."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_nearid import load_model
from comfy_nearid.embedding_cache import (
    EmbeddingCache,
    cached_embed,
    default_cache_path,
    file_content_hash,
    image_cache_keys,
    pixels_content_hash,
)
from comfy_nearid.errors import ConfigError, InvalidInputError

from _scoring_helpers import subprocess_env, write_image


def _vector(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def test_vectors_come_back_bit_exact_and_misses_are_absent(tmp_path):
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        stored = {f"sha256:{i:064x}": _vector(i) for i in range(5)}
        assert cache.put_many("model-a", stored) == 5
        got = cache.get_many("model-a", [*stored, "sha256:missing"])
        assert set(got) == set(stored)
        for key, vec in stored.items():
            assert got[key].dtype == np.float32
            np.testing.assert_array_equal(got[key], vec)
        assert cache.get("model-a", "sha256:missing") is None
    # Persistent: a new object on the same file reads the same bytes.
    with EmbeddingCache(tmp_path / "c.sqlite") as again:
        np.testing.assert_array_equal(again.get("model-a", f"sha256:{3:064x}"), _vector(3))
        assert again.count("model-a") == 5


def test_a_model_never_reads_another_models_entries(tmp_path):
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.put("backbone|head=aaaa", "sha256:x", _vector(1))
        cache.put("backbone|head=bbbb", "sha256:x", _vector(2))
        np.testing.assert_array_equal(cache.get("backbone|head=aaaa", "sha256:x"), _vector(1))
        np.testing.assert_array_equal(cache.get("backbone|head=bbbb", "sha256:x"), _vector(2))
        # A prefix or a never-seen identity is a different namespace: nothing to read.
        assert cache.get("backbone|head=", "sha256:x") is None
        assert cache.get("backbone", "sha256:x") is None
        assert cache.count("backbone|head=aaaa") == 1 and cache.count() == 2
        assert cache.model_identities() == ["backbone|head=aaaa", "backbone|head=bbbb"]
        assert cache.clear("backbone|head=aaaa") == 1
        assert cache.get("backbone|head=aaaa", "sha256:x") is None
        assert cache.get("backbone|head=bbbb", "sha256:x") is not None


def test_first_write_wins(tmp_path):
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        assert cache.put("m", "k", _vector(1)) is True
        assert cache.put("m", "k", _vector(2)) is False
        np.testing.assert_array_equal(cache.get("m", "k"), _vector(1))


def test_bad_vectors_and_identities_are_refused(tmp_path):
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(InvalidInputError, match="NaN"):
            cache.put("m", "k", np.array([1.0, np.nan], dtype=np.float32))
        with pytest.raises(InvalidInputError, match="1-D"):
            cache.put("m", "k", np.zeros((2, 2), dtype=np.float32))
        with pytest.raises(InvalidInputError, match="identity"):
            cache.put("", "k", _vector(0))


def test_file_keys_are_the_sha256_of_the_bytes(tmp_path, rng):
    a = write_image(tmp_path / "a.png", rng)
    copy = tmp_path / "sub" / "copy.png"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    b = write_image(tmp_path / "b.png", rng)
    expected = "sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()
    assert file_content_hash(a) == expected
    assert file_content_hash(copy) == expected  # content, not name, is the key
    assert file_content_hash(b) != expected


def test_pixel_keys_agree_across_input_kinds_and_depend_on_shape(rng):
    arr = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    pil = Image.fromarray(arr)
    comfy = torch.from_numpy(arr).float().unsqueeze(0) / 255.0  # ComfyUI IMAGE [1,H,W,C]
    _, keys_pil, _ = image_cache_keys([pil])
    _, keys_comfy, _ = image_cache_keys(comfy)
    assert keys_pil == keys_comfy == [pixels_content_hash(arr)]
    same_bytes_other_shape = arr.reshape(10, 6, 3)
    assert pixels_content_hash(same_bytes_other_shape) != pixels_content_hash(arr)
    mask = np.ones((6, 10), dtype=np.float32)
    _, masked, _ = image_cache_keys([pil], masks=mask)
    assert masked[0].startswith(keys_pil[0] + "|mask-sha256:")


class _ModelThatMustNotRun:
    """Has the real model's identity; embedding anything fails the test."""

    def __init__(self, identity: str) -> None:
        self.identity = identity

    def embed(self, *args, **kwargs):
        raise AssertionError("the model was called although every embedding was cached")


def test_cached_embed_equals_the_model_and_a_rerun_touches_no_model(tiny_model, tmp_path, rng):
    paths = [write_image(tmp_path / f"im{i}.png", rng) for i in range(4)]
    pil = Image.fromarray(rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8))
    expected = torch.cat([tiny_model.embed(paths), tiny_model.embed([pil])])
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        first = cached_embed(tiny_model, [*paths, pil], cache)
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
        assert cache.count(tiny_model.identity) == 5
        again = cached_embed(_ModelThatMustNotRun(tiny_model.identity), [*paths, pil], cache)
        torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_another_model_gets_its_own_embeddings_from_a_shared_cache(tiny_model, tmp_path, rng):
    other = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=1)
    assert other.identity != tiny_model.identity
    paths = [write_image(tmp_path / f"im{i}.png", rng) for i in range(3)]
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cached_embed(tiny_model, paths, cache)
        mine = cached_embed(other, paths, cache)
    torch.testing.assert_close(mine, other.embed(paths), rtol=0, atol=1e-6)
    assert not torch.allclose(mine, tiny_model.embed(paths), atol=1e-3)


def test_masked_embeddings_are_cached_separately(tiny_model, tmp_path, rng):
    paths = [write_image(tmp_path / f"im{i}.png", rng, size=(30, 30)) for i in range(2)]
    mask = np.zeros((30, 30), dtype=np.float32)
    mask[5:25, 5:25] = 1.0
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        plain = cached_embed(tiny_model, paths, cache)
        masked = cached_embed(tiny_model, paths, cache, masks=mask)
        assert cache.count(tiny_model.identity) == 4
    torch.testing.assert_close(masked, tiny_model.embed(paths, masks=mask), rtol=0, atol=1e-6)
    assert not torch.allclose(plain, masked, atol=1e-4)


def test_a_file_that_is_not_a_cache_is_refused_naming_it(tmp_path):
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_text("definitely not sqlite " * 100)
    with pytest.raises(ConfigError, match="bogus.sqlite"):
        EmbeddingCache(bogus)
    with pytest.raises(ConfigError, match="directory"):
        EmbeddingCache(tmp_path)


def test_read_only_cache_reads_but_never_writes(tmp_path):
    path = tmp_path / "c.sqlite"
    assert EmbeddingCache(tmp_path / "absent.sqlite", readonly=True).get_many("m", ["k"]) == {}
    with EmbeddingCache(path) as cache:
        cache.put("m", "k", _vector(4))
    with EmbeddingCache(path, readonly=True) as ro:
        np.testing.assert_array_equal(ro.get("m", "k"), _vector(4))
        with pytest.raises(ConfigError, match="read-only"):
            ro.put("m", "k2", _vector(5))


def test_default_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NEARID_EMBEDDING_CACHE", str(tmp_path / "x.sqlite"))
    assert default_cache_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("NEARID_EMBEDDING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "comfy_nearid" / "embeddings.sqlite"


_READER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from comfy_nearid.embedding_cache import EmbeddingCache
    path, n_keys = sys.argv[1], int(sys.argv[2])
    keys = [f"k{i}" for i in range(n_keys)]
    seen, reads = set(), 0
    with EmbeddingCache(path, readonly=True) as cache:
        while len(seen) < n_keys:
            for key, vec in cache.get_many("writer-model", keys).items():
                expected = np.full(4, float(key[1:]), dtype=np.float32)
                if not np.array_equal(vec, expected):
                    print("WRONG", key, vec, flush=True); sys.exit(3)
                seen.add(key)
            reads += 1
            if reads == 1:  # the writer waits for this before it writes the other keys
                print("READY", len(seen), flush=True)
    print("OK", reads, len(seen), flush=True)
    """
)


@pytest.mark.slow
def test_concurrent_readers_in_other_processes_see_only_complete_entries(tmp_path):
    """Three reader processes read while this one writes: each reader's first read happens
    before the writing starts (handshake), so it sees a partial cache and must read again
    while the writes go on; every entry it ever sees is complete."""
    path = tmp_path / "shared.sqlite"
    n_keys = 200
    with EmbeddingCache(path) as writer:
        writer.put("writer-model", "k0", np.zeros(4, dtype=np.float32))
        readers = [
            subprocess.Popen([sys.executable, "-c", _READER, str(path), str(n_keys)],
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        try:
            for r in readers:
                first = r.stdout.readline().split()
                assert first == ["READY", "1"], f"reader failed before writing began: {first} {r.stderr.read()}"
            # Write while they read: small transactions, as the scorer does per batch.
            for start in range(1, n_keys, 10):
                batch = {f"k{i}": np.full(4, float(i), dtype=np.float32) for i in range(start, min(start + 10, n_keys))}
                writer.put_many("writer-model", batch)
            outputs = [r.communicate(timeout=300) for r in readers]
        finally:
            for r in readers:
                if r.poll() is None:
                    r.kill()
                    r.wait()
    for r, (out, err) in zip(readers, outputs):
        assert r.returncode == 0, f"reader failed: {out} {err}"
        status, reads, seen = out.split()
        assert status == "OK" and int(seen) == n_keys and int(reads) > 1


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_connections_of_finished_threads_are_closed(tmp_path):
    import os
    import threading

    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.put("m", "k", _vector(0))
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):  # like the decode threads of 20 scoring runs in a long-lived process
            t = threading.Thread(target=cache.get_many, args=("m", ["k"]))
            t.start()
            t.join()
        after = len(os.listdir("/proc/self/fd"))
    assert after - before <= 3  # at most one extra connection (db, -wal, -shm) stays open


def test_reduced_precision_models_get_their_own_namespace():
    from comfy_nearid.embedding_cache import model_cache_identity

    fp32 = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32")
    bf16 = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="bf16")
    assert model_cache_identity(fp32) == fp32.identity
    assert model_cache_identity(bf16) == bf16.identity == fp32.identity + "|dtype=bfloat16"
