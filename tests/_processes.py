"""Free loopback ports and multi-process launches that survive a port taken by someone else.

A port found free here cannot be reserved until the child binds it, and on a shared machine
another test run (or another job) may take it first. So every launch that needs a port picks a
free one and, when the child fails because the port is in use, starts again on a new one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any, Callable, Sequence

# How torch's TCPStore (torchrun, accelerate launch) and aiohttp report a port already bound.
PORT_TAKEN_MESSAGES = ("address already in use", "eaddrinuse", "errno 98", "error while attempting to bind")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_was_taken(output: str) -> bool:
    """Whether a child's output says its port was bound by another process."""
    lowered = output.lower()
    return any(message in lowered for message in PORT_TAKEN_MESSAGES)


def run_with_free_port(
    make_command: Callable[[int], Sequence[str]], attempts: int = 4, **run_kwargs: Any
) -> subprocess.CompletedProcess:
    """``subprocess.run(make_command(port), capture_output=True, text=True, **run_kwargs)`` on a
    free port, again on a new port (up to ``attempts`` runs) when the port was taken."""
    for attempt in range(1, attempts + 1):
        result = subprocess.run(list(make_command(free_port())), capture_output=True, text=True, **run_kwargs)
        if result.returncode == 0 or attempt == attempts or not port_was_taken(result.stderr + result.stdout):
            return result
    raise AssertionError("unreachable")


def accelerate_launch(
    args: Sequence[str], num_processes: int = 2, attempts: int = 4, **run_kwargs: Any
) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N ... ARGS`` on CPU (gloo processes; on a
    machine without GPUs ``--cpu`` alone would start one process), on a free port."""

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *args,
        ]

    return run_with_free_port(command, attempts=attempts, **run_kwargs)


def torchrun(args: Sequence[str], nproc: int = 2, attempts: int = 4, **run_kwargs: Any) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N ... ARGS`` on a free port."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port), *args]

    return run_with_free_port(command, attempts=attempts, **run_kwargs)
