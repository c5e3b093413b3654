"""Scoring on a real local Ray (2 CPUs, started once for this module): folder, parquet and
webdataset inputs give the rows of `nearid score`; a driver killed midway resumes to the rows
of an uninterrupted run; an actor that dies is restarted and its partition retried; the
Python API (`map_batches(IdentityScorer, ...)`) on an img2dataset parquet set."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest

from comfy_nearid.cli import main
from comfy_nearid.scoring.partitions import read_partition_rows

from _scale_helpers import CORRUPT_KEY, assert_same_rows, scale_image_set  # noqa: F401 (fixture)
from _scoring_helpers import REPO, TINY_MODEL_ARGS, nearid_command, subprocess_env, write_image, write_smooth_image

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TINY_SPEC = dict(backbone="tiny-siglip", pretrained=False, seed=0, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray with 2 CPUs for the whole module; workers import this checkout."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), previous) if p)
    # Its own session folder (short: Ray's socket paths must fit 107 bytes), so it never meets
    # another Ray on this machine; shut down and removed at the end.
    session_dir = tempfile.mkdtemp(prefix="nearid-ray-")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=session_dir)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(session_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


@pytest.mark.parametrize("inputs", ["gen", "parquet/*.parquet", "wds/*.tar"])
def test_ray_gives_the_rows_of_nearid_score(ray_address, scale_image_set, tmp_path, inputs, capsys):
    root, expected = scale_image_set
    out = tmp_path / "out"
    assert main(["score", "--references-root", str(root / "refs"), str(root / inputs), "-o", str(out),
                 "--engine", "ray", "--ray-address", ray_address, "--concurrency", "2", "--partition-size", "5",
                 "--batch-size", "4", *TINY_MODEL_ARGS, "--no-cache"]) == 0
    printed = capsys.readouterr().out
    assert "14 image(s), 1 unreadable" in printed
    rows = read_partition_rows(out)
    assert len(rows) == 14
    assert_same_rows(rows, expected)
    corrupt = [r for r in rows if CORRUPT_KEY in r.path]
    assert len(corrupt) == 1 and corrupt[0].score is None and corrupt[0].error


def _partition_files(out):
    return sorted(out.glob("part-*.parquet")) if out.is_dir() else []


def test_driver_killed_midway_then_resume_equals_an_uninterrupted_run(ray_address, tmp_path, capsys):
    rng = np.random.default_rng(11)
    write_image(tmp_path / "ref.png", rng)
    for i in range(60):
        write_smooth_image(tmp_path / "gen" / f"{i:03d}.jpg", rng, side=384)
    common = ["score", "--reference", str(tmp_path / "ref.png"), str(tmp_path / "gen"), "--partition-size", "5",
              "--batch-size", "5", *TINY_MODEL_ARGS, "--no-cache"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(nearid_command(*common, "-o", str(killed), "--engine", "ray", "--ray-address", ray_address),
                            cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not _partition_files(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)  # polls for the first partition file; the kill follows it at once
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-3000:]}"
    finished = len(_partition_files(killed))
    assert 1 <= finished < 12, f"killed with {finished} of 12 partitions written: not midway"
    assert main([*common, "-o", str(killed), "--engine", "ray", "--concurrency", "2", "--resume"]) == 0
    assert f"12 partition(s), {finished} taken from the previous run" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert main([*common, "-o", str(straight)]) == 0  # uninterrupted, in this process
    resumed_rows, straight_rows = read_partition_rows(killed), read_partition_rows(straight)
    assert len(resumed_rows) == 60 and len({r.path for r in resumed_rows}) == 60
    assert [r.path for r in resumed_rows] == [r.path for r in straight_rows]
    assert_same_rows(resumed_rows, straight_rows)
    assert [p.name for p in _partition_files(killed)] == [p.name for p in _partition_files(straight)]
    assert not list(killed.glob(".*tmp*"))


def test_an_actor_that_dies_is_restarted_and_its_partition_retried(ray_address, scale_image_set, tmp_path):
    from comfy_nearid import load_model
    from comfy_nearid.ray import RayEngine
    from comfy_nearid.scoring.partitions import PartitionOptions, score_partitions
    from comfy_nearid.scoring.sources import reference_subjects_from_root, shard_partitions

    root, _ = scale_image_set
    model = load_model(**TINY_SPEC)
    partitions = shard_partitions([str(root / "wds" / "*.tar")])
    references = reference_subjects_from_root(root / "refs")
    options = PartitionOptions(batch_size=4, num_workers=0, progress=False)
    marker = tmp_path / "actor-exited"
    engine = RayEngine(TINY_SPEC, concurrency=1, ray_remote_args={
        "runtime_env": {"env_vars": {"NEARID_TEST_ACTOR_EXIT_ONCE": f"00001={marker}"}}})
    result = score_partitions(model, partitions, references, tmp_path / "ray", options=options, engine=engine)
    assert marker.exists(), "the test hook never fired: no actor died"
    assert result.num_images == 14
    # CPU actors and a CPU driver model: the driver embedded the references (no worker task),
    # each actor ran one torch thread (its one CPU), and both partitions were timed.
    assert "references" not in engine.phases
    assert sorted(t.partition for t in engine.partition_timings) == ["00000", "00001"]
    assert {t.torch_threads for t in engine.partition_timings} == {1}
    assert all(t.constructed <= t.ready <= t.started <= t.finished for t in engine.partition_timings)
    score_partitions(model, partitions, references, tmp_path / "local", options=options)
    rows = read_partition_rows(tmp_path / "ray")
    assert len(rows) == 14
    assert_same_rows(rows, read_partition_rows(tmp_path / "local"))


def test_python_api_map_batches_on_img2dataset_parquet(ray_address, scale_image_set):
    from comfy_nearid.ray import IdentityScorer, reference_embeddings
    from comfy_nearid.scoring.partitions import rows_from_table
    from comfy_nearid.scoring.sources import reference_subjects_from_root

    import pyarrow as pa

    root, expected = scale_image_set
    references = reference_embeddings(TINY_SPEC, reference_subjects_from_root(root / "refs"), batch_size=4)
    ds = ray.data.read_parquet(str(root / "parquet"))
    scored = ds.map_batches(IdentityScorer, fn_constructor_kwargs=dict(model=TINY_SPEC, references=references),
                            batch_size=4, compute=ray.data.ActorPoolStrategy(size=1), batch_format="pyarrow")
    table = pa.Table.from_pylist(scored.take_all())
    rows = rows_from_table(table)
    assert len(rows) == 14
    assert_same_rows(rows, expected, check_ranks=False)  # ranks need every row of a subject
