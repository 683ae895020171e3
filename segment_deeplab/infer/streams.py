"""Two images at once on a CPU, one per core: the one concurrency trick of inference.

On the 2-core CPUs measured (BENCHMARKS.md §4), one image per core runs the forward
pass 1.25x (Xeon) to 3x (AMD EPYC) faster than one image spread over both cores, and
reading, scoring and writing one image overlaps with the other's forward pass.
`evaluate` and `predict` both run their batches through `in_streams`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")
R = TypeVar("R")


def stream_count(model: nn.Module) -> int:
    """Two streams for a torch model on a CPU with two threads or more, else one.

    A model without parameters there (an onnxruntime export) runs on threads of its own;
    GPUs and builds without OpenMP (whose thread count is not per thread) get one.
    """
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or not torch.backends.openmp.is_available():
        return 1
    return 2 if torch.get_num_threads() >= 2 else 1


def in_streams(
    fn: Callable[[T], R], items: Sequence[T], model: nn.Module, streams: int | None = None
) -> Iterator[R]:
    """`fn` over `items`, in order, in `stream_count(model)` threads (or `streams`).

    Each thread gets its share of the intra-op threads; the process-wide setting is
    restored afterwards. An exception from `fn` is raised here and no further item
    starts. Grad mode and autocast are per thread: `fn` sets what it needs. A single
    item runs in the caller's thread, on all the threads.
    """
    streams = stream_count(model) if streams is None else streams
    if streams <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    before = torch.get_num_threads()
    pending: deque[Future[R]] = deque()
    pool = ThreadPoolExecutor(
        streams, initializer=torch.set_num_threads, initargs=(max(1, before // streams),)
    )
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > streams:  # one queued per stream: no idle core
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # on an error or an early stop, start nothing more
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(before)
