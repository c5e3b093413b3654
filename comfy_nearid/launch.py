"""Where this process stands in a multi-process launch (``accelerate launch``, torchrun, MPI):
the one place that reads the launchers' environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["LaunchInfo", "launch_info", "process_device"]

# torchrun / `accelerate launch --multi_gpu` set WORLD_SIZE/RANK/LOCAL_RANK; MPI launchers
# (which `accelerate launch --cpu --mpirun_hostfile` uses) set their own.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


@dataclass(frozen=True)
class LaunchInfo:
    """``rank`` of ``world_size`` processes; ``local_rank`` on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_info() -> LaunchInfo:
    """This process's place, from the launcher's environment (one process when none is set)."""
    return LaunchInfo(
        rank=_first_int(_RANK_VARS, 0),
        world_size=_first_int(_WORLD_SIZE_VARS, 1),
        local_rank=_first_int(_LOCAL_RANK_VARS, 0),
    )


def process_device(device: str | None) -> str | None:
    """The device a process should use: ``device`` when given or when one process runs;
    under a multi-process launch each process takes its own GPU (``cuda:<local rank>``), or
    the CPU without one."""
    info = launch_info()
    if device is not None or not info.is_distributed:
        return device
    import torch

    return f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
