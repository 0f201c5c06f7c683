"""Continuous batching inside a replica: whatever arrived while the model was busy forms the next batch.

``@serve.batch`` waits ``batch_wait_timeout_s`` after a batch's first request (latency added to every lone
request) and, with that timeout at 0, forms one-item batches that then queue behind each other. Decoding
steps are short and arrive in waves, so here a batch starts as soon as the previous one ends and takes
everything queued meanwhile (up to ``max_rows`` rows) — with one exception, ``gather_s``:

The sessions one batch answered come back for their next step one round trip later, a few milliseconds
apart. Taking only what is queued at that moment splits them: the first back runs alone, the others queue
behind it and run as a second batch, and from then on the two groups alternate and never merge again
(measured over Serve: 4 sessions ran as 2 rows per forward instead of 4). So when fewer rows are queued
than were live at the end of the previous batch (its rows, which come back, and those queued meanwhile),
the next batch waits until that many are, at most ``gather_s`` and at most half the previous batch's run
time: a lone session never waits, and the wait stays small against the forward the stragglers then share.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class ContinuousBatcher(Generic[T, R]):
    """``await submit(item)`` -> ``fn(batch)[i]``; ``fn`` (a blocking function of a list of items returning
    one result per item) runs on a worker thread, one batch at a time. ``size(item)`` is an item's rows;
    ``gather_s`` bounds the wait for the previous batch's sessions (module docstring; 0: never wait)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_rows: int = 32,
        size: Callable[[T], int] = lambda _: 1,
        gather_s: float = 0.0,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if gather_s < 0:
            raise ValueError("gather_s must be >= 0")
        self.fn = fn
        self.max_rows = max_rows
        self.size = size
        self.gather_s = gather_s
        self._queue: deque[tuple[T, asyncio.Future]] = deque()
        self._task: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self._last_rows = 0
        self._last_s = 0.0
        self.batches = 0
        self.items = 0
        self.rows = 0
        self.gathered_s = 0.0  # time batches waited for the previous batch's sessions, in all
        self.busy_s = 0.0  # time ``fn`` ran, in all (busy_s / wall time: how loaded the replica is)

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.append((item, future))
        if self._arrived is not None:
            self._arrived.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    def _queued_rows(self) -> int:
        return sum(self.size(item) for item, future in self._queue if not future.done())

    def _take(self) -> list[tuple[T, asyncio.Future]]:
        batch: list[tuple[T, asyncio.Future]] = []
        rows = 0
        while self._queue:
            item, future = self._queue[0]
            if future.done():  # cancelled by its caller
                self._queue.popleft()
                continue
            if batch and rows + self.size(item) > self.max_rows:
                break
            self._queue.popleft()
            batch.append((item, future))
            rows += self.size(item)
        return batch

    async def _gather(self) -> None:
        """Wait, briefly, until as many rows are queued as were live after the previous batch (module docstring)."""
        want = min(self._last_rows, self.max_rows)
        wait = min(self.gather_s, 0.5 * self._last_s)
        if wait <= 0 or self._queued_rows() >= want:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._arrived = arrived = asyncio.Event()
        try:
            while self._queued_rows() < want:
                left = started + wait - loop.time()
                if left <= 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except TimeoutError:
                    break
        finally:
            self._arrived = None
            self.gathered_s += loop.time() - started

    async def _drain(self) -> None:
        while self._queue:
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            rows = sum(self.size(item) for item, _ in batch)
            self.rows += rows
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as err:
                if len(batch) == 1:
                    _settle(batch[0][1], error=err)
                    continue
                # one bad item must not fail the others: run them one by one
                for item, future in batch:
                    try:
                        (result,) = await asyncio.to_thread(self.fn, [item])
                        _settle(future, result=result)
                    except Exception as single:
                        _settle(future, error=single)
                continue
            finally:  # the live rows: this batch's (they come back) and those that queued meanwhile
                self._last_rows, self._last_s = rows + self._queued_rows(), time.perf_counter() - started
                self.busy_s += self._last_s
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result=result)


def _settle(future: asyncio.Future, *, result: object = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


__all__ = ["ContinuousBatcher"]
