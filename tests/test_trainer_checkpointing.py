"""`--resume latest|PATH` resolution, crash-safe checkpoint folders, pruning."""

from __future__ import annotations

import pytest

from comfy_nearid.errors import CheckpointError
from trainer.checkpointing import (
    TrainingProgress,
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
    remove_stale_temporaries,
    resolve_resume,
)


def _make(base, *names):
    for name in names:
        (base / name).mkdir(parents=True)
        (base / name / "model.safetensors").write_bytes(b"x")


def test_resolve_resume_cases(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert resolve_resume(None, ckpts) is None
    assert resolve_resume("", ckpts) is None
    assert resolve_resume("none", ckpts) is None
    # latest with nothing saved yet: start from scratch (a job can always pass --resume latest)
    assert resolve_resume("latest", ckpts) is None
    _make(ckpts, "step_00000010", "step_00000200", "step_00000030", ".tmp-step_00000300", "notes")
    # numeric order, not string order; an unfinished .tmp folder is never "latest"
    assert resolve_resume("latest", ckpts) == ckpts / "step_00000200"
    assert resolve_resume("LATEST", ckpts) == ckpts / "step_00000200"
    assert resolve_resume(str(ckpts / "step_00000010"), ckpts) == ckpts / "step_00000010"
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_resume(str(tmp_path / "missing"), ckpts)
    with pytest.raises(CheckpointError, match="unfinished checkpoint"):
        resolve_resume(str(ckpts / ".tmp-step_00000300"), ckpts)


def test_list_prune_and_stale_temporaries(tmp_path):
    _make(tmp_path, "step_00000001", "step_00000002", "step_00000003", ".tmp-step_00000004")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    removed = prune_checkpoints(tmp_path, total_limit=2)
    assert [p.name for p in removed] == ["step_00000001"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".tmp-step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_checkpoint_names_sort_numerically():
    assert checkpoint_name(7) == "step_00000007"
    assert sorted([checkpoint_name(100), checkpoint_name(20)]) == [checkpoint_name(20), checkpoint_name(100)]


def test_progress_state_round_trip():
    p = TrainingProgress(global_step=5, epoch=1, batches_in_epoch=3, samples_seen=40, best_metric=12.5, best_step=4)
    q = TrainingProgress()
    q.load_state_dict(p.state_dict())
    assert q == p
