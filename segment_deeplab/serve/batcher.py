"""Dynamic batching: concurrent requests share forward passes.

Each request hands its decoded image to `Batcher.submit` and awaits the answer. One
asyncio task (`Batcher.run`) takes the oldest waiting image and gathers the other
waiting images of the same size, until `max_batch` of them are there or the oldest has
waited `max_delay` seconds, whichever comes first; then it runs them as one forward pass
in a worker thread, so the event loop keeps accepting (and decoding) requests meanwhile.
Images of another size wait for a pass of their own (a batch is one stacked tensor).
Under load the queue fills while a pass runs, so the next batch is full at once and
`max_delay` only costs latency when the server is nearly idle.

A failing pass never stops the task: a batch that raises is run again one image at a
time, so only the image that caused it gets the error (its request answers 500), and the
next batch runs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("segment_deeplab.serve")

# The forward pass: images (uint8 (3, H, W) tensors of one size) -> one result each.
Forward = Callable[[Sequence[Any]], Sequence[Any]]


@dataclass
class Answer:
    """One image's result and what it cost."""

    result: Any  # what `forward` returned for this image (class ids for the server)
    batch: int  # images in the forward pass that made it
    queued_ms: float  # from `submit` to the start of the pass
    forward_ms: float  # the pass (shared by the whole batch)


@dataclass
class _Job:
    image: Any
    size: tuple[int, ...]
    future: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Stats:
    """Counters for /healthz: forward passes, images in them, the largest, failures."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    failures: int = 0

    def count(self, n: int) -> None:
        self.batches += 1
        self.images += n
        self.largest = max(self.largest, n)


class Batcher:
    """Gathers same-size images from concurrent requests into batched forward passes.

    Args:
        forward: runs a list of same-size images in one pass and returns one result each;
            called in a single worker thread, never two at once.
        max_batch: most images per pass.
        max_delay: seconds the oldest waiting image waits for company.
    """

    def __init__(self, forward: Forward, max_batch: int = 8, max_delay: float = 0.010) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be 0 or more seconds, got {max_delay}")
        self.forward = forward
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.stats = Stats()
        self._pending: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread: passes run one after another, each using torch's own threads.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="deeplab-forward")

    async def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self.run(), name="deeplab-batcher")

    async def stop(self) -> None:
        """Stop the task; requests still waiting are cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        self._worker.shutdown(wait=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the forward thread (e.g. a warm-up pass before serving)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def submit(self, image: Any) -> Answer:
        """Queue one image (a (3, H, W) tensor) and wait for its answer.

        Raises:
            Exception: whatever `forward` raised for this image.
        """
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running (Batcher.start)")
        job = _Job(image, tuple(image.shape[-2:]), asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    async def run(self) -> None:
        """Gather and run batches until cancelled; no failure ends it."""
        while True:
            try:
                batch = await self._gather()
                if batch:
                    await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the server answering
                log.exception("batcher: unexpected failure; carrying on")

    async def _wait(self, timeout: float | None) -> None:
        """Until `submit` adds a job (or `timeout` seconds pass)."""
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _gather(self) -> list[_Job]:
        """The oldest job and those of its size, once there are enough or it waited enough."""
        while not self._pending:
            await self._wait(None)
        oldest = self._pending[0]
        deadline = oldest.t0 + self.max_delay
        while self._count(oldest.size) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            await self._wait(left)
        return self._take(oldest.size)

    def _count(self, size: tuple[int, ...]) -> int:
        return sum(1 for j in self._pending if j.size == size)

    def _take(self, size: tuple[int, ...]) -> list[_Job]:
        """Remove up to `max_batch` jobs of `size` from the queue, oldest first; jobs
        whose client went away (cancelled futures) are dropped on the way."""
        batch, rest = [], deque()
        for job in self._pending:
            if job.future.done():
                continue
            if job.size == size and len(batch) < self.max_batch:
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results = await self.call(self.forward, [j.image for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"forward gave {len(results)} results for {len(batch)}")
        except Exception as e:
            if len(batch) > 1:  # find the image at fault: each alone, the rest still answered
                for job in batch:
                    await self._run([job])
                return
            self.stats.failures += 1
            _settle(batch[0].future, error=e)
            return
        ms = (time.perf_counter() - start) * 1000
        self.stats.count(len(batch))
        for job, result in zip(batch, results, strict=True):
            answer = Answer(result, len(batch), (start - job.t0) * 1000, ms)
            _settle(job.future, answer)


def _settle(future: asyncio.Future, answer: Answer | None = None, error: Exception | None = None):
    if future.done():  # the client went away while its image was in the pass
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(answer)
