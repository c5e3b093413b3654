"""Crash-safe training checkpoints and ``--resume latest|PATH``.

A checkpoint is an ``accelerator.save_state`` folder named ``step_<N>`` under
``<output_dir>/checkpoints``. It is written into ``.tmp-step_<N>`` and renamed when complete,
so a crash (even SIGKILL) never leaves a half-written ``step_<N>``; only then are the oldest
checkpoints beyond ``total_limit`` deleted. (Accelerate's own automatic naming writes in place
and deletes old checkpoints before the new one exists, which a crash can leave with none.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from comfy_nearid.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"

__all__ = [
    "TrainingProgress",
    "checkpoint_name",
    "list_checkpoints",
    "prune_checkpoints",
    "remove_stale_temporaries",
    "resolve_resume",
    "save_checkpoint",
]


@dataclass
class TrainingProgress:
    """Where the run is; saved in every checkpoint (``register_for_checkpointing``)."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batches_in_epoch: int = 0  # per-process batches of the current epoch already consumed
    samples_seen: int = 0  # global samples trained on
    best_metric: float = float("-inf")
    best_step: int = -1
    last_loss: float = float("nan")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``checkpoints_dir`` as ``(step, path)``, oldest first."""
    base = Path(checkpoints_dir)
    if not base.is_dir():
        return []
    found = []
    for entry in base.iterdir():
        m = CHECKPOINT_PATTERN.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def resolve_resume(resume: str | None, checkpoints_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from.

    - ``None``, ``""`` or ``"none"``: start fresh (None).
    - ``"latest"``: the newest complete checkpoint in ``checkpoints_dir``, or None (with a log
      line) when there is none yet, so a job can always be (re)started with ``--resume latest``.
    - anything else: a checkpoint folder that must exist (:class:`CheckpointError` otherwise).
    """
    if resume is None or resume.strip().lower() in ("", "none"):
        return None
    if resume.strip().lower() == "latest":
        found = list_checkpoints(checkpoints_dir)
        if not found:
            logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", checkpoints_dir)
            return None
        return found[-1][1]
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint folder (give 'latest' or a folder like "
            f"{Path(checkpoints_dir) / checkpoint_name(100)})"
        )
    if path.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"--resume {resume}: {path.name} is an unfinished checkpoint (a crash while saving)")
    return path


def remove_stale_temporaries(checkpoints_dir: str | Path) -> list[Path]:
    """Delete unfinished ``.tmp-*`` checkpoint folders left by a crash; returns them."""
    base = Path(checkpoints_dir)
    removed = []
    if base.is_dir():
        for entry in base.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry)
                removed.append(entry)
                logger.warning("removed unfinished checkpoint %s (left by an interrupted save)", entry)
    return removed


def prune_checkpoints(checkpoints_dir: str | Path, total_limit: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; returns them."""
    found = list_checkpoints(checkpoints_dir)
    doomed = [path for _, path in found[: max(0, len(found) - total_limit)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Any, checkpoints_dir: str | Path, step: int, total_limit: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, then rename it to ``step_<N>``.

    Every process must call this (each writes its own RNG state). Returns the final folder.
    """
    base = Path(checkpoints_dir)
    final = base / checkpoint_name(step)
    tmp = base / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if accelerator.is_main_process:
        base.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():
            # The same step saved twice (a resumed run reaching a step it had saved): the
            # complete folder already there stays; never leave a moment without one.
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)  # atomic: readers see no folder or the complete one
            _fsync_dir(base)
        for path in prune_checkpoints(base, total_limit):
            logger.info("deleted old checkpoint %s (checkpoint.total_limit=%d)", path, total_limit)
    accelerator.wait_for_everyone()
    return final
