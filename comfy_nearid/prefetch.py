"""Batches prepared ahead in decode threads, in order, with bounded memory.

The one read-ahead of the package: scoring (``nearid score``), the evaluator's embedding
pass and the trainer's feature cache all decode the next batches' images in threads while
the model runs on the current one (PIL's decoders and the numpy/torch copies release the GIL).

On a CPU whose cores the model already keeps busy, decode threads beside it only interrupt
its parallel regions; :func:`batches_on_cores` instead runs whole batches (decode and
model) side by side, one per core, each on one thread (the trainer's feature cache, the
evaluator's scorers with ``cores > 1``); :func:`cores_for` says how many for a device.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["batches_on_cores", "cores_for", "prefetch"]


def prefetch(
    prepare: Callable[..., R],
    batches: Iterable[Sequence[T]],
    num_workers: int,
    depth: int,
    pixel_buffer: "Callable[[int], torch.Tensor] | None" = None,
) -> Iterator[tuple[Sequence[T], list[R], "torch.Tensor | None"]]:
    """Yield ``(batch, prepared, pixels)`` in order while ``depth`` further batches are prepared
    in ``num_workers`` threads (``num_workers=0``: prepare inline). At most ``depth + 1`` batches
    of pixels exist at once, so memory does not grow with the number of images.

    ``pixel_buffer(n)`` (optional) gives each batch its ``[n, 3, S, S]`` float32 buffer; item
    ``i`` is then prepared as ``prepare(item, out=pixels[i])``, so the decode threads write the
    pixels straight into the batch the model reads (no per-image tensors stacked afterwards).
    Without it, ``pixels`` is ``None`` and items are prepared as ``prepare(item)``."""

    def start(batch: Sequence[T]) -> "tuple[torch.Tensor | None, list[Callable[[], R]]]":
        pixels = None if pixel_buffer is None else pixel_buffer(len(batch))
        calls = [(lambda item=item: prepare(item)) if pixels is None else (lambda item=item, i=i: prepare(item, out=pixels[i]))
                 for i, item in enumerate(batch)]
        return pixels, calls

    if num_workers <= 0:
        for batch in batches:
            pixels, calls = start(batch)
            yield batch, [call() for call in calls], pixels
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="nearid-decode")
    pending: deque[tuple[Sequence[T], "torch.Tensor | None", list[Future]]] = deque()
    source = iter(batches)

    def submit_next() -> None:
        batch = next(source, None)
        if batch is not None:
            pixels, calls = start(batch)
            pending.append((batch, pixels, [pool.submit(call) for call in calls]))

    try:
        for _ in range(depth + 1):
            submit_next()
        while pending:
            batch, pixels, futures = pending.popleft()
            prepared = [f.result() for f in futures]
            yield batch, prepared, pixels
            # Only once the consumer is done with this batch: the batch in hand plus `depth`
            # batches ahead, never `depth + 2`.
            submit_next()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def cores_for(device: "torch.device | str") -> int:
    """How many batches :func:`batches_on_cores` runs side by side for a model on ``device``:
    torch's thread count on a CPU; 1 elsewhere (a GPU is fed by decode threads instead)."""
    import torch

    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


@contextmanager
def _one_thread_per_op() -> Iterator[None]:
    """torch's intra-op threads set to 1 (the setting is process-wide), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batches_on_cores(
    work: Callable[[Sequence[T]], R], batches: Iterable[Sequence[T]], cores: int
) -> Iterator[tuple[Sequence[T], R]]:
    """Yield ``(batch, work(batch))`` in order while ``cores`` threads each run ``work`` on
    whole batches, torch's operators on one thread each (``cores <= 1``: inline, torch's
    threads untouched).

    For CPU work that is decode plus a model: a model on N intra-op threads stops at every
    operator for its slowest thread, and decode threads running beside it are what makes one
    slow; N independent single-threaded batches never wait for each other. Measured on the
    demo's MobileNetV2 feature cache, 2 cores: 1.21x the images per second of decode threads
    beside a two-thread model (``benchmarks/bench_feature_cache.py --compare-build``).

    ``work`` must be thread-safe (torch's operators and PIL's decoders release the GIL). torch's
    intra-op thread count is process-wide: it is 1 while this runs, so nothing else in the
    process should run torch operators meanwhile. At most ``2 * cores`` batches are in flight.
    """
    if cores <= 1:
        for batch in batches:
            yield batch, work(batch)
        return
    source = iter(batches)
    pending: deque[tuple[Sequence[T], Future]] = deque()
    with _one_thread_per_op():
        pool = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="nearid-core")
        try:

            def submit_next() -> None:
                batch = next(source, None)
                if batch is not None:
                    pending.append((batch, pool.submit(work, batch)))

            for _ in range(2 * cores):
                submit_next()
            while pending:
                batch, future = pending.popleft()
                result = future.result()
                submit_next()
                yield batch, result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
