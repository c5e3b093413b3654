"""comfy-nearid trainer: Accelerate training of NearID identity heads (two-tier objective).

    python -m trainer --config trainer/configs/synth.yaml [--section.key VALUE ...]
    accelerate launch -m trainer --config trainer/configs/paper.yaml --resume latest

or in Python: ``trainer.train(trainer.load_config(path, overrides)) -> TrainResult``.
See ``docs/training.md``.
"""

from __future__ import annotations

_LAZY = {
    "train": "trainer.loop",
    "TrainResult": "trainer.loop",
    "TrainingDivergedError": "trainer.loop",
    "TrainConfig": "trainer.config",
    "load_config": "trainer.config",
    "config_from_dict": "trainer.config",
    "two_tier_infonce": "trainer.losses",
    "two_tier_terms": "trainer.losses",
    "resolve_resume": "trainer.checkpointing",
    "CONFIGS_DIR": "trainer.cli",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    # Lazy: `python -m trainer --help` and `import trainer` stay light (no torch/accelerate).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
