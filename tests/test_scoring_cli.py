"""`nearid score` as users run it: the CLI in-process, a real process killed with SIGKILL and
resumed, and `accelerate launch --cpu --num_processes 2`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from _processes import accelerate_launch
from comfy_nearid.cli import main

from _scoring_helpers import (
    TINY_MODEL_ARGS,
    cosines_direct,
    nearid_command,
    run_nearid,
    subprocess_env,
    write_broken_files,
    write_image,
    write_smooth_image,
)


def _count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    return max(0, path.read_bytes().count(b"\n") - 1)  # minus the CSV header


def test_cli_single_subject_prints_the_summary_and_writes_every_output(tiny_model, tmp_path, rng, capsys):
    refs = [write_image(tmp_path / "ref" / f"{i}.png", rng) for i in range(2)]
    gens = [write_image(tmp_path / "gen" / f"{i}.png", rng) for i in range(5)]
    write_broken_files(tmp_path / "gen", rng)
    argv = ["score", "--reference", str(tmp_path / "ref"), str(tmp_path / "gen"), "-o", str(tmp_path / "o.jsonl"),
            "--dreambench-json", str(tmp_path / "db.json"), "--cache", str(tmp_path / "c.sqlite"), *TINY_MODEL_ARGS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "9 image(s), 4 unreadable" in printed and "ref " in printed
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["error"] is None for r in rows].count(True) == 5
    good = {Path(r["path"]).name: r for r in rows if r["error"] is None}
    expected = cosines_direct(tiny_model, refs, gens).mean(axis=1)
    np.testing.assert_allclose([good[g.name]["score"] for g in gens], expected, atol=2e-6)
    config = json.loads((tmp_path / "o.config.json").read_text())
    assert config["layout"] == "single" and config["model"]["random_weights"] is True
    assert config["batch_size"] == 16  # no --batch-size on the CPU: the measured CPU default
    assert (tmp_path / "o.summary.json").exists() and (tmp_path / "db.json").exists()
    # A second run refuses to overwrite, and says how to proceed.
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --strict turns the first broken file into a failure.
    assert main([*argv, "--overwrite", "--strict"]) == 2
    assert "b_corrupt.png" in capsys.readouterr().err


def test_cli_stops_before_any_work_on_bad_layouts(tmp_path, rng, capsys):
    write_image(tmp_path / "gen" / "0.png", rng)
    out = tmp_path / "o.csv"
    cases = [
        (["--reference", str(tmp_path / "missing.png"), str(tmp_path / "gen")], "missing.png does not exist"),
        (["--reference", str(tmp_path / "gen" / "0.png")], "give at least one GEN_DIR"),
        (["--mapping", str(tmp_path / "m.csv"), str(tmp_path / "gen")], "remove the positional"),
        ([str(tmp_path / "gen")], "choose exactly one layout"),
    ]
    for args, message in cases:
        assert main(["score", *args, "-o", str(out), *TINY_MODEL_ARGS, "--no-cache"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def _kill_when_held(cmd: list[str], rows_file: Path, cwd: Path, rows_before_hold: int) -> int:
    """Run ``cmd`` with ``NEARID_SCORE_HOLD_AFTER_ROWS=rows_before_hold``: once that many rows
    are flushed the run logs "holding after rows N" and waits for a signal, a state it cannot
    leave by itself. SIGKILL it there, however late this process runs. (The loop below only
    waits for that log line; its deadline bounds a failure.)"""
    env = {**subprocess_env(), "NEARID_SCORE_HOLD_AFTER_ROWS": str(rows_before_hold)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        seen = b""
        while f"holding after rows {rows_before_hold}".encode() not in seen:
            line = proc.stderr.readline()  # blocks until the run writes a line (or exits)
            assert line or proc.poll() is None, f"the run ended before it held: {seen.decode()[-2000:]}"
            assert time.monotonic() < deadline, "the run never reached the hold"
            seen += line
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _count_rows(rows_file)


@pytest.mark.slow
def test_sigkill_midway_then_resume_equals_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(7)
    write_image(tmp_path / "ref.png", rng)
    total, held_at = 120, 60  # batches of 10: the run holds once six batches are flushed
    for i in range(total):
        write_smooth_image(tmp_path / "gen" / f"{i:03d}.jpg", rng, side=256)
    common = ["--reference", "ref.png", "gen", "--batch-size", "10", "--workers", "1", *TINY_MODEL_ARGS,
              "--dreambench-json"]
    killed = ["score", *common, "killed.db.json", "-o", "killed.csv", "--cache", "killed.sqlite"]
    written = _kill_when_held(nearid_command(*killed), tmp_path / "killed.csv", tmp_path, held_at)
    assert written == held_at  # every batch up to the hold, and nothing after it
    resumed = run_nearid([*killed, "--resume"], cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} taken from the previous run" in resumed.stdout
    straight = run_nearid(["score", *common, "straight.db.json", "-o", "straight.csv", "--no-cache"], cwd=tmp_path,
                          timeout=600)
    assert straight.returncode == 0, straight.stderr
    killed_rows = (tmp_path / "killed.csv").read_text().splitlines()
    straight_rows = (tmp_path / "straight.csv").read_text().splitlines()
    assert len(killed_rows) == total + 1 and len(set(killed_rows)) == total + 1  # header + rows, none twice
    assert killed_rows == straight_rows
    assert (tmp_path / "killed.db.json").read_text() == (tmp_path / "straight.db.json").read_text()
    assert json.loads((tmp_path / "killed.summary.json").read_text())["subjects"] == \
        json.loads((tmp_path / "straight.summary.json").read_text())["subjects"]


@pytest.mark.slow
def test_two_accelerate_processes_give_the_same_rows_as_one(tmp_path):
    """Two real CPU processes. `accelerate launch --cpu --num_processes 2` starts ONE process
    unless MPI is set up (accelerate's simple launcher); `--multi_gpu` on a machine without a
    GPU starts two through torchrun, and `--device cpu` makes them form a gloo group."""
    pytest.importorskip("accelerate")
    rng = np.random.default_rng(3)
    for subject in ("dog", "cat"):
        for i in range(2):
            write_image(tmp_path / "refs" / subject / f"{i}.png", rng)
        for i in range(23 if subject == "dog" else 14):
            write_image(tmp_path / "gen" / subject / f"{i}.png", rng)
    write_broken_files(tmp_path / "gen" / "cat", rng)
    common = ["score", "--references-root", "refs", "gen", "--batch-size", "4", *TINY_MODEL_ARGS, "--no-cache"]
    one = run_nearid([*common, "-o", "one.csv", "--dreambench-json", "one.json"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = accelerate_launch(["-m", "comfy_nearid", *common, "-o", "two.csv", "--dreambench-json", "two.json"],
                            cwd=tmp_path, env=subprocess_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 0/2" in two.stderr and "process 1/2" in two.stderr  # really two processes
    assert two.stdout.count("image(s),") == 1  # only the main process reports
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()
    assert not list(tmp_path.glob("two.csv.part-*"))  # per-process parts merged and removed
    config = json.loads((tmp_path / "two.config.json").read_text())
    assert config["num_processes"] == 2


def test_the_console_entry_makes_idle_openmp_threads_sleep_unless_told_otherwise():
    from comfy_nearid.cli import command_of, default_openmp_policy

    for command in ("score", "consistency"):
        environ: dict[str, str] = {}
        default_openmp_policy(environ, torch_loaded=False, command=command)
        assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's environment wins
    default_openmp_policy(chosen, torch_loaded=False, command="score")
    assert chosen == {"OMP_WAIT_POLICY": "ACTIVE"}
    late: dict[str, str] = {}  # torch's OpenMP already read the policy: nothing pretends otherwise
    default_openmp_policy(late, torch_loaded=True, command="score")
    assert late == {}
    # the backbone-bound commands keep OpenMP's own default (spin briefly, then sleep)
    for command in ("demo", "eval", "calibrate", "synth", None):
        untouched: dict[str, str] = {}
        default_openmp_policy(untouched, torch_loaded=False, command=command)
        assert untouched == {}
    assert command_of(["-v", "demo", "--quick"]) == "demo" and command_of(["--version"]) is None


def test_every_command_in_the_process_settings_table_exists():
    from comfy_nearid.cli import COMMANDS, PROCESS_SETTINGS, process_settings

    assert set(PROCESS_SETTINGS) <= set(COMMANDS)
    # the commands that run a backbone over many images keep freed buffers; the generator
    # (numpy rendering) and the demo (which turns it on after generating) do not here
    assert {c for c in COMMANDS if process_settings(c).keep_freed_memory} == {"score", "consistency", "eval", "calibrate"}
    assert not process_settings("synth").keep_freed_memory and not process_settings(None).passive_openmp
