"""The one launch/rank helper reads every launcher's variables."""

from __future__ import annotations

import sys

import pytest

from comfy_nearid.launch import LaunchInfo, launch_info, process_device

_ALL = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _ALL:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_launcher(clean_env):
    assert launch_info() == LaunchInfo(0, 1, 0)
    assert process_device(None) is None and process_device("cpu") == "cpu"


def test_torchrun_and_mpi_variables(clean_env):
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("RANK", "3")
    clean_env.setenv("LOCAL_RANK", "1")
    info = launch_info()
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert info.is_distributed and not info.is_main
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        clean_env.delenv(name)
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "1")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert launch_info() == LaunchInfo(1, 2, 1)
    assert process_device("cuda:0") == "cuda:0"  # an explicit device wins


@pytest.fixture
def process_group(tmp_path):
    """A real one-process gloo group, as `accelerate launch` / torchrun leave each process with."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():  # the assertion failed: do not leak the group into other tests
        dist.destroy_process_group()


def _hand_csv(path):
    path.write_text("id,sim_01,cross_00,cross_11\na,0.9,0.2,0.1\nb,0.3,0.5,0.2\n")
    return path


@pytest.mark.parametrize("ends", ["finished", "bad input", "unexpected error"])
def test_nearid_commands_end_the_process_group_however_they_end(ends, process_group, tmp_path, monkeypatch):
    """A process that exits with a live gloo group can abort in interpreter shutdown (SIGABRT:
    "terminate called without an active exception"), failing a finished multi-process run."""
    from comfy_nearid import cli

    argv = {"finished": ["eval", "ssr", "--csv", str(_hand_csv(tmp_path / "s.csv")), "--bootstrap", "10"],
            "bad input": ["eval", "ssr", "--csv", str(tmp_path / "missing.csv")],
            "unexpected error": ["eval", "ssr", "--csv", str(_hand_csv(tmp_path / "s.csv"))]}[ends]
    expected = {"finished": 0, "bad input": 2, "unexpected error": cli.EXIT_UNEXPECTED}[ends]
    if ends == "unexpected error":  # a failure no check foresaw, inside the command
        def broken(args):
            assert process_group.is_initialized()
            raise RuntimeError("boom")

        monkeypatch.setattr(cli._load_command("eval"), "run", broken)
    assert process_group.is_initialized()
    assert cli.main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == expected
    assert not process_group.is_initialized()


@pytest.mark.parametrize("argv, expected", [(["--print-config"], 0), (["--print-config", "--train.epochz", "5"], 2)])
def test_trainer_ends_the_process_group_however_it_ends(argv, expected, process_group, capsys):
    from trainer.cli import main

    assert main(argv) == expected
    assert not process_group.is_initialized()


def test_ending_without_a_group_does_nothing():
    from comfy_nearid.launch import end_process_group

    end_process_group()  # no group formed (and torch maybe not imported): no error
    import torch.distributed as dist

    assert not dist.is_initialized()


_EXIT_SCRIPT = """
import atexit, logging, sys
from comfy_nearid.launch import exit_process
atexit.register(lambda: print("finalized", flush=True))
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
logging.getLogger("x").info("logged before the exit")
print("written before the exit", end="")  # no newline, no flush: exit_process must flush it
exit_process(3)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_skips_finalization_only_in_a_multi_process_launch(world_size, clean_env, tmp_path):
    """In a multi-process launch the process leaves through os._exit (gloo worker threads can
    still need the interpreter during finalization), after flushing what it wrote."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, WORLD_SIZE=world_size, RANK="0", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 3
    assert proc.stdout.startswith("written before the exit")
    assert "logged before the exit" in proc.stderr
    assert ("finalized" in proc.stdout) == (world_size == "1")


_GROUP_SCRIPT = """
import os, sys, tempfile
from comfy_nearid.launch import end_process_group, prepare_process_group
if sys.argv[1] == "prepared":
    prepare_process_group()
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rv"), rank=0, world_size=1)
import torch.distributed.nn  # what importing open_clip (a model scorer) after the group formed does
out = [None]
dist.all_gather_object(out, {"rows": [1, 2]})
end_process_group()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sum(name.startswith("pt_gloo") for name in threads))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "not-prepared"])
def test_a_prepared_process_group_stops_its_threads_when_destroyed(prepared, tmp_path):
    """torch.distributed.nn's functions take the default group as a default argument: imported
    after the group formed (open_clip imports it), it holds the group, and destroying the group
    leaves gloo's worker threads running. prepare_process_group imports it first."""
    import os
    import subprocess
    from pathlib import Path

    pytest.importorskip("torch.distributed")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _GROUP_SCRIPT, "prepared" if prepared else "plain"],
                          env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gloo_threads = int(proc.stdout.strip().splitlines()[-1])
    # the unprepared case shows the test can tell the two apart
    assert (gloo_threads == 0) if prepared else (gloo_threads > 0)


def test_forming_a_group_without_accelerate_says_what_to_install(monkeypatch):
    """`nearid score` and `nearid eval` under a multi-process launch form their group here."""
    from comfy_nearid.errors import InvalidInputError
    from comfy_nearid.launch import process_state

    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` raises ImportError
    with pytest.raises(InvalidInputError, match="needs accelerate: pip install accelerate"):
        process_state(cpu=True)
