"""Large freed blocks kept for reuse by the C library's allocator (glibc), process-wide.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold
(dynamic, at most 32 MB on 64-bit) with fresh ``mmap`` pages and unmaps them when freed, so a
loop that allocates the same large buffers every iteration page-faults and zeroes them anew
each time. MobileNetV2's widest activation at 8 images per pass is 38.5 MB (96 channels at
112 x 112); with glibc's defaults its passes on 2 CPU cores spent about a fifth of their time
in the kernel (6.8 million page faults in 30 s) and ran at 88 img/s, against about 150 with
the blocks kept (``benchmarks/bench_malloc.py`` prints both side by side). Training from the
feature cache gained about a third per step the same way (``trainer.train``).

:func:`keep_freed_memory` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB:
freed blocks stay in the process and the next allocation reuses them. Memory use stays at
the peak instead of going down between passes. The ``nearid`` commands that run a backbone
(``cli.PROCESS_SETTINGS``), the demo after its generation step and ``trainer.train`` call it
(they own their process); the ComfyUI nodes do not (the process is ComfyUI's). Not the
synthetic generator: its many mid-sized numpy arrays ran slower with it. A no-op returning
False where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

MMAP_THRESHOLD = 1 << 30  # blocks below this come from the heap (and go back to it when freed)
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top kept up to this much
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers


def keep_freed_memory() -> bool:
    """Let glibc keep and reuse large freed blocks (see the module docstring); returns whether
    it applied (False where the C library is not glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return False
    # a glibc that caps the threshold (at half its 64 MB arena heap) refuses 1 GiB: take its cap
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, 32 << 20))
