"""Continuous batching inside a replica: whatever arrived while the model was busy forms the next batch.

``@serve.batch`` waits ``batch_wait_timeout_s`` after a batch's first request (latency added to every lone
request) and, with that timeout at 0, forms one-item batches that then queue behind each other. Decoding
steps are short and arrive in waves, so here the model never waits: a batch starts as soon as the previous
one ends and takes everything queued meanwhile (up to ``max_rows`` rows).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class ContinuousBatcher(Generic[T, R]):
    """``await submit(item)`` -> ``fn(batch)[i]``; ``fn`` (a blocking function of a list of items returning
    one result per item) runs on a worker thread, one batch at a time. ``size(item)`` is an item's rows."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_rows: int = 32,
        size: Callable[[T], int] = lambda _: 1,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.fn = fn
        self.max_rows = max_rows
        self.size = size
        self._queue: deque[tuple[T, asyncio.Future]] = deque()
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

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

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
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
