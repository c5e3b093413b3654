"""Where this process stands in a multi-process launch (``accelerate launch``, torchrun, MPI),
and its process group from start to exit: the one place that reads the launchers' environment
variables, forms the group (:func:`process_state`), destroys it (:func:`end_process_group`) and
ends the process (:func:`exit_process`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = [
    "LaunchInfo", "end_process_group", "exit_process", "launch_info", "prepare_process_group", "process_device",
    "process_state",
]

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


def prepare_process_group() -> None:
    """Import, before a process group forms, the torch module whose functions take the default
    group as a default argument (``torch.distributed.nn``, which open_clip imports): imported
    after the group formed, those defaults hold the group for the rest of the process, and
    destroying it no longer stops gloo's worker threads. Everything that forms a group calls
    it first (:func:`process_state`, the trainer before its ``Accelerator``)."""
    import importlib

    try:
        importlib.import_module("torch.distributed.nn")
    except ImportError:  # torch built without distributed: no group can form anyway
        pass


def process_state(cpu: bool) -> "PartialState":
    """accelerate's ``PartialState`` of this launch; the first call forms the process group
    (gloo with ``cpu=True``: without CUDA, ``accelerate launch --multi_gpu`` processes must be
    told to use the CPU). See :func:`prepare_process_group`.

    Raises:
        InvalidInputError: accelerate is not installed."""
    try:
        from accelerate import PartialState
    except ImportError as e:
        from .errors import InvalidInputError

        raise InvalidInputError("running on several processes needs accelerate: pip install accelerate") from e
    prepare_process_group()
    return PartialState(cpu=cpu)


def end_process_group() -> None:
    """Destroy this process's default ``torch.distributed`` process group, if it formed one.

    The commands call it once their work is over, however it ended. Local: no collective, so a
    process that failed alone does not wait for the others. Does nothing when torch was never
    imported or no group exists."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with exit status ``code``: the commands' entry points end here.

    One process of a multi-process launch leaves without interpreter finalization
    (``os._exit`` once the output streams and log handlers are flushed). A gloo worker thread
    can still be releasing the tensors of the last collective (``all_gather_object``'s) when
    the main thread finishes; it then needs the interpreter lock, and during finalization that
    kills it inside a C++ destructor: "terminate called without an active exception", SIGABRT,
    and the launcher reports a finished run as failed (5 runs in 80 of a two-process
    ``nearid eval`` on 2 cores; destroying the group first joins the threads only when nothing
    else holds it, see :func:`prepare_process_group`). A single process exits normally."""
    if launch_info().is_distributed:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
                pass
        os._exit(code)
    sys.exit(code)


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
