"""Batches prepared ahead in decode threads, in order, with bounded memory.

The one read-ahead of the package: scoring (``nearid score``), the evaluator's embedding
pass and the trainer's feature cache all decode the next batches' images in threads while
the model runs on the current one (PIL's decoders and the numpy/torch copies release the GIL).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["prefetch"]


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
