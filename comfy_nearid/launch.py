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


def hold_if_requested(env_var: str, count: int, what: str) -> None:
    """A test-only switch: when ``$env_var`` is set to ``count``, log ``holding after <what>
    <count>`` and wait until a signal ends the process (SIGINT raises KeyboardInterrupt here).

    Interruption tests use it to stop long work in a state it cannot leave by itself (the
    trainer after step N: ``NEARID_TRAIN_HOLD_AFTER_STEP``; ``nearid score`` once N rows are
    flushed: ``NEARID_SCORE_HOLD_AFTER_ROWS``), so the signal never races the work. Unset, it
    does nothing."""
    import logging
    import time

    from .errors import ConfigError

    value = os.environ.get(env_var)
    if not value:
        return
    try:
        target = int(value)
    except ValueError as e:
        raise ConfigError(f"{env_var} must be a whole number, got {value!r}") from e
    if count != target:
        return
    logging.getLogger(__name__).warning("holding after %s %d (%s is set): waiting for a signal", what, count, env_var)
    while True:  # a signal is the only way out
        time.sleep(3600)
