"""Shared test fixtures. Tests run offline on tiny random models built from configs."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Never reach a model hub from a test, whatever the environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("NEARID_ALLOW_DOWNLOAD", None)
os.environ.pop("NEARID_TRAIN_HOLD_AFTER_STEP", None)  # only the interruption tests set it, per child
os.environ.pop("NEARID_SCORE_HOLD_AFTER_ROWS", None)

try:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
except ImportError:  # the import-only tests do not need torch
    torch = None


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny SigLIP-architecture model with random (seeded) weights, fp32, CPU."""
    from comfy_nearid import load_model

    return load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache_dir(tmp_path_factory):
    """Keep the library's file-hash memo out of the real home folder."""
    os.environ["NEARID_HASH_MEMO"] = str(tmp_path_factory.mktemp("nearid-user-cache") / "file_hashes.json")
    yield
