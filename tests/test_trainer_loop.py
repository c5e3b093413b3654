"""The training loop end to end on tiny random backbones: what trains, what is exported,
NaN stops, crash + resume, and two processes against one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from comfy_nearid import load_model
from comfy_nearid.checkpoint import read_head_metadata
from trainer.config import config_to_dict
from trainer.loop import HOLD_AFTER_STEP_ENV, TrainingDivergedError, train, warmup_cosine
from trainer.tracking import read_metrics

from _processes import accelerate_launch
from _trainer_helpers import make_folder_dataset, tiny_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("loop-data"), n_samples=16)


def test_warmup_then_cosine_schedule():
    # Hand-worked values: warm-up 4 steps, 12 in all -> cosine over the 8 after the warm-up.
    assert [warmup_cosine(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 12) == 1.0
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5)
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0)
    assert warmup_cosine(12, 4, 12, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 4, 12, schedule="constant") == 1.0


@pytest.mark.slow
def test_only_the_head_trains_and_the_backbone_stays_bit_identical(tmp_path, data_root):
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=0)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    cfg = tiny_config(tmp_path, data_root, train__epochs=1)  # live: tokens through the backbone
    result = train(cfg, model=model)
    assert result.global_step == 4
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    changed = [k for k, v in model.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert set(changed) == set(head_before)  # every head tensor moved
    exported = load_file(result.last_head_path)
    for key, value in model.head.state_dict().items():
        assert torch.equal(exported[key], value)


@pytest.mark.slow
def test_run_exports_head_with_provenance_logs_and_checkpoints(tmp_path, data_root):
    cfg = tiny_config(
        tmp_path, data_root,
        train__epochs=3, data__val_fraction=0.25, data__test=str(data_root),
        eval__every_steps=2, eval__baseline=True, checkpoint__every_steps=2, checkpoint__total_limit=2,
        features__cache=True,
    )
    result = train(cfg)
    run = Path(cfg.output_dir)
    assert result.global_step == 3 * (12 // 4)
    # resolved config in the run directory
    assert yaml.safe_load((run / "config.yaml").read_text()) == config_to_dict(cfg)
    # checkpoints: every 2 steps, newest 2 kept, no temporaries
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008", "step_00000009"]
    # the exported head loads through the library's one factory, with its provenance
    meta = read_head_metadata(result.head_path)
    assert meta.backbone == "tiny-siglip"
    prov = meta.provenance
    assert prov["steps"] == 9 and prov["config"]["seed"] == 0
    assert prov["data"]["train"]["samples"] == 12 and prov["data"]["val"]["samples"] == 4
    assert prov["selected"] == "best-validation"
    assert prov["metrics"]["validation"]["step"] == result.best_step
    assert 0 <= prov["metrics"]["test"]["ssr"] <= 100
    assert set(prov["metrics"]["test"]["by_source"]) == {"object", "part"}
    assert prov["metrics"]["baseline_test"]["n_samples"] == 16 * 2  # 16 samples x 2 sources
    # the identity-match curve, fitted on the validation pairs: 4 samples x 3 view pairs
    # against 4 samples x 3 views x 2 sources
    curve = meta.calibration
    assert curve["provenance"]["split"] == "validation"
    assert (curve["n_same"], curve["n_near"]) == (4 * 3, 4 * 3 * 2)
    model = load_model(head=result.head_path, pretrained=False, device="cpu", dtype="fp32")
    best = load_file(run / "head_best.safetensors")
    assert all(torch.equal(model.head.state_dict()[k], best[k]) for k in best)
    # tracker rows: the loss every step, validation every 2 steps
    rows = read_metrics(run / "logs" / "nearid" / "metrics.csv")
    assert [s for s, n, _ in rows if n == "train/loss"] == list(range(1, 10))
    assert [s for s, n, _ in rows if n == "val/ssr"] == [2, 4, 6, 8, 9]
    assert all(np.isfinite(v) for _, n, v in rows if n.startswith("train/"))
    acc = [v for _, n, v in rows if n == "train/tier1_top1_acc"]
    assert acc and all(0.0 <= v <= 1.0 for v in acc)


@pytest.mark.slow
def test_bf16_and_gradient_accumulation_run(tmp_path, data_root):
    cfg = tiny_config(
        tmp_path, data_root, train__epochs=1, train__mixed_precision="bf16", train__gradient_accumulation_steps=3
    )
    result = train(cfg)
    assert result.global_step == 2  # 4 batches, accumulated by 3: a full step and the remainder
    assert np.isfinite(result.final_loss)


@pytest.mark.slow
def test_tensorboard_tracker_writes_events(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, train__epochs=1, logging__tracker="tensorboard")
    train(cfg)
    assert list((Path(cfg.output_dir) / "logs").rglob("events.out.tfevents.*"))


def test_training_refuses_a_dataset_without_distractors(tmp_path):
    from comfy_nearid.errors import DatasetError

    data = make_folder_dataset(tmp_path / "nod", n_samples=8, distractors=False)
    with pytest.raises(DatasetError, match="no near-identity distractor"):
        train(tiny_config(tmp_path, data))
    single = make_folder_dataset(tmp_path / "single", n_samples=8, n_views=1)
    with pytest.raises(DatasetError, match="fewer than two valid views"):
        train(tiny_config(tmp_path, single))


@pytest.mark.slow
def test_trains_on_the_published_parquet_layout(tmp_path, data_root):
    """Positives + one row-aligned distractor table as parquet files (the hub's layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = sorted(p.name for p in data_root.iterdir())
    cell = lambda path: {"bytes": path.read_bytes(), "path": path.name}  # noqa: E731
    positives = {"id": ids, "category": ["box"] * len(ids)}
    negatives = {"id": ids}
    for k in (1, 2, 3):
        positives[f"img{k}"] = [cell(data_root / i / f"view{k}.png") for i in ids]
        negatives[f"nimg{k}"] = [cell(data_root / i / "object" / f"distractor{k}.png") for i in ids]
    pq.write_table(pa.table(positives), tmp_path / "positives.parquet")
    pq.write_table(pa.table(negatives), tmp_path / "flux.parquet")
    cfg = tiny_config(tmp_path, data_root, train__epochs=1, features__cache=True)
    cfg.data.format = "published"
    cfg.data.train = str(tmp_path / "positives.parquet")
    cfg.data.distractor_paths = {"flux": str(tmp_path / "flux.parquet")}
    result = train(cfg)
    assert result.global_step == 4
    meta = read_head_metadata(result.head_path)
    assert meta.provenance["data"]["train"]["distractor_sources"] == ["flux"]


def _corrupt_sample_tokens(cache_dir: Path, sample_dir: Path) -> None:
    """Write NaN into the cached tokens of every image of one sample."""
    index = json.loads((cache_dir / "index.json").read_text())
    keys = {hashlib.sha1(p.read_bytes()).hexdigest() for p in sample_dir.rglob("*.png") if "mask" not in p.name}
    rows = [i for i, k in enumerate(index["keys"]) if k in keys]
    assert rows
    tokens = np.load(cache_dir / index["shards"][0]["tokens"], mmap_mode="r+")
    tokens[rows] = np.nan
    tokens.flush()


@pytest.mark.slow
def test_nan_loss_stops_naming_step_samples_and_last_checkpoint(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, train__epochs=2, features__cache=True, checkpoint__every_steps=1)
    train(cfg)  # builds the cache (clean run)
    _corrupt_sample_tokens(Path(cfg.output_dir) / "feature_cache", data_root / "id0005")
    cfg2 = tiny_config(tmp_path / "again", data_root, train__epochs=2, features__cache=True, checkpoint__every_steps=1)
    cfg2.features.cache_dir = str(Path(cfg.output_dir) / "feature_cache")
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg2)
    message = str(info.value)
    step = int(re.search(r"at step (\d+)", message).group(1))
    assert "id0005" in message
    if step > 1:
        assert f"step_{step - 1:08d}" in message
    else:
        assert "none (no checkpoint saved yet)" in message
    assert not (Path(cfg2.output_dir) / "head.safetensors").exists()


def _write_config(tmp_path: Path, cfg) -> Path:
    path = tmp_path / f"{Path(cfg.output_dir).parent.name}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


@pytest.mark.slow
def test_sigkill_then_resume_latest_equals_an_uninterrupted_run(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_samples=40, seed=3)
    overrides = dict(train__epochs=5, checkpoint__every_steps=3, checkpoint__total_limit=2)
    reference = train(tiny_config(tmp_path / "straight", data, **overrides))

    killed_cfg = tiny_config(tmp_path / "killed", data, **overrides)
    path = _write_config(tmp_path, killed_cfg)
    # The run holds after step 3 (its checkpoint written) until the signal: it cannot finish
    # first, however late this process is scheduled.
    env = {**os.environ, "OMP_NUM_THREADS": "1", HOLD_AFTER_STEP_ENV: "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "--config", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True,
    )
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "holding after step 3" in line:
                break
        else:
            pytest.fail("the run never reached step 3:\n" + "".join(seen[-20:]))
        assert (Path(killed_cfg.output_dir) / "checkpoints" / "step_00000003").is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (Path(killed_cfg.output_dir) / "head.safetensors").exists()  # it died mid-run

    resumed_cfg = tiny_config(tmp_path / "killed", data, **overrides)
    resumed_cfg.checkpoint.resume = "latest"
    resumed = train(resumed_cfg)
    assert resumed.resumed_from is not None and resumed.resumed_from.name.startswith("step_")
    assert resumed.global_step == reference.global_step == 5 * 10
    a, b = load_file(reference.last_head_path), load_file(resumed.last_head_path)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert resumed.final_loss == pytest.approx(reference.final_loss, rel=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process_over_the_same_global_batch(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_samples=16, seed=4)
    overrides = dict(train__epochs=1, train__batch_size=8, features__cache=True)
    single = train(tiny_config(tmp_path / "one", data, **overrides))

    two_cfg = tiny_config(tmp_path / "two", data, **overrides)
    path = _write_config(tmp_path, two_cfg)
    # `--multi_gpu` on a machine without (visible) GPUs starts torch.distributed processes
    # that Accelerate runs on CPU with gloo; `--cpu` alone would start a single process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = accelerate_launch(["-m", "trainer", "--config", str(path)], timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr and "global batch 8 (4 per process)" in result.stderr

    def losses(run):
        return [v for _, n, v in read_metrics(Path(run) / "logs" / "nearid" / "metrics.csv") if n == "train/loss"]

    one, two = losses(single.run_dir), losses(two_cfg.output_dir)
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=1e-6)
    a = load_file(single.last_head_path)
    b = load_file(Path(two_cfg.output_dir) / "head_last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
