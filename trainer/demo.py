"""The demo's training step (`nearid demo`, step 3), where the trainer is reachable.

The library's :func:`comfy_nearid.demo.run_demo` holds no training code: it takes a
``train_head`` callable. This module supplies it (:func:`train_demo_head`: the trainer's tuned
synthetic recipe ``configs/synth.yaml`` adapted to the demo's batch size and time budget) and
:func:`run_demo`, the library's run with it filled in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from comfy_nearid.checkpoint import load_head_file
from comfy_nearid.demo import (
    DEMO_LR,
    STEP_OVERHEAD,
    CALIBRATION_LEVEL,
    CPU_IMAGE_BATCH,
    TRAIN_LEVELS,
    TRAIN_MODE,
    VAL_FRACTION,
    VAL_SPLIT_BY,
    DemoResult,
    DemoSettings,
    kept_for_training,
    measure_step_seconds,
    plan_training,
)
from comfy_nearid.demo import run_demo as _run_demo
from comfy_nearid.model import IdentityModel

from .cli import CONFIGS_DIR
from .config import TrainConfig, config_from_dict, load_config
from .loop import TrainResult, train

logger = logging.getLogger(__name__)

__all__ = ["demo_train_config", "run_demo", "train_demo_head"]


def demo_train_config(settings: DemoSettings, out: Path, epochs: int, steps: int, device_type: str) -> TrainConfig:
    """The trainer config of the demo's training step."""
    base = load_config(CONFIGS_DIR / "synth.yaml")  # the trainer's tuned synthetic recipe
    values = {
        "output_dir": str(out / "train"),
        "seed": settings.seed,
        "model": {"backbone": settings.backbone, "pretrained": settings.pretrained,
                  "backbone_weights": settings.backbone_weights, "backbone_seed": settings.seed,
                  "init_head": "own", "head_seed": settings.seed},
        "data": {"format": "folder", "train": str(out / "data"), "train_split": "train",
                 "sources": list(TRAIN_LEVELS), "distractor_mode": TRAIN_MODE,
                 "val_fraction": VAL_FRACTION, "val_split_by": VAL_SPLIT_BY, "test": None},
        "features": {"cache": True, "cache_dir": str(out / "train" / "feature_cache"),
                     "batch_size": CPU_IMAGE_BATCH if device_type == "cpu" else base.features.batch_size},
        # the demo's own learning rate (DEMO_LR, measured at its batch size and plan)
        "optim": {"lr": DEMO_LR, "warmup_steps": min(base.optim.warmup_steps, max(1, steps // 10))},
        "train": {"epochs": epochs, "max_steps": steps, "batch_size": settings.batch_size,
                  "cpu": device_type == "cpu", "mixed_precision": "no"},
        "checkpoint": {"every_steps": 0},  # the demo never resumes; the head files are what counts
        "eval": {"every_steps": max(5, steps // 8), "baseline": False, "calibration_sources": [CALIBRATION_LEVEL]},
        "logging": {"every_steps": max(1, min(10, steps // 10))},
    }
    config = config_from_dict(values, base)
    config.check()
    return config


def train_demo_head(model: IdentityModel, settings: DemoSettings, out: Path, progress: bool) -> tuple[TrainResult, float | None]:
    """Train the head in place (the best validation head loaded back); returns the
    :class:`trainer.TrainResult` and the estimated seconds per step (None for the fixed plan)."""
    kept = kept_for_training(settings.n_train)
    per_epoch = kept // settings.batch_size
    if settings.minutes is None:  # the fixed plan: the same steps, and so the same head, anywhere
        epochs, steps, step_s = settings.epochs, settings.epochs * per_epoch, None
        logger.info("training %d steps (%d epochs of %d samples, batch %d)", steps, epochs, kept, settings.batch_size)
    else:
        slots = 1 + 2 + 3  # anchor, P=2 positives, K=3 distractors (synth.yaml)
        step_s = measure_step_seconds(model, settings.batch_size, slots) * STEP_OVERHEAD
        epochs, steps = plan_training(kept, settings.batch_size, step_s, settings.minutes, settings.epochs)
        logger.info("training budget %.1f min at ~%.2f s/step: %d steps (%d epochs of %d samples, batch %d)",
                    settings.minutes, step_s, steps, epochs, kept, settings.batch_size)
    config = demo_train_config(settings, out, epochs, steps, model.device.type)
    config.logging.progress = progress
    result = train(config, model=model)
    state, _ = load_head_file(result.head_path)  # the best head on validation
    model.head.load_state_dict(state)
    model.head.requires_grad_(False).eval()
    model.invalidate_identity()
    return result, step_s


def run_demo(out_dir: str | Path, **options: Any) -> DemoResult:
    """:func:`comfy_nearid.demo.run_demo` with the trainer's :func:`train_demo_head`."""
    return _run_demo(out_dir, train_head=train_demo_head, **options)
