"""comfy_nearid.malloc: large freed blocks kept for reuse (glibc), measured by page faults in a
fresh process (the setting is process-wide, so never applied to the test process itself)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# 10 allocations of 48 MB, each written then freed (after 20 that let the heap settle): above
# glibc's largest dynamic mmap threshold (32 MB), so by default each one is a fresh mapping
# whose pages fault in again
_PROGRAM = """
import resource, sys
import torch
from comfy_nearid.malloc import keep_freed_memory

torch.set_num_threads(1)  # every block allocated, written and freed by this one thread

if sys.argv[1] == "kept":
    assert keep_freed_memory()

def faults(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.empty(48 << 20, dtype=torch.uint8)
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults(20)  # while the heap grows to its working size, blocks fault in either way
print(faults(10))
"""


def _faults(mode: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_large_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("kept")
    # default: every block's pages fault in again (48 MB = 12,288 pages of 4 KB; even with
    # 2 MB transparent huge pages, 24 per block); kept: the heap's pages are reused (measured
    # here: no fault in 6 of 6 runs; with only 6 warm-up blocks, up to 3 of the 10 faulted in)
    assert default >= 10 * 24
    assert kept * 4 < default


def test_keep_freed_memory_applies_exactly_where_the_c_library_is_glibc():
    out = subprocess.run(
        [sys.executable, "-c", "from comfy_nearid.malloc import keep_freed_memory; print(keep_freed_memory())"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")
