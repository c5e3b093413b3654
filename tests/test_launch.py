"""The one launch/rank helper reads every launcher's variables."""

from __future__ import annotations

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
