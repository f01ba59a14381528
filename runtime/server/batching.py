"""Dynamic batching on the event loop: requests that arrive within `max_wait_s` of the first
are run together, up to `max_size`, in a worker thread (ONNX Runtime releases the GIL)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

# A batch function returns one entry per item: its result, or the exception for that item
# alone, so one bad request never fails the others in its batch.
BatchFunction = Callable[[Sequence[Any]], list[Any]]


class DynamicBatcher:
    def __init__(self, run_batch: BatchFunction, max_size: int, max_wait_s: float, executor: Executor | None = None) -> None:
        if max_size < 1:
            raise ValueError(f"max batch size must be at least 1, not {max_size}")
        self.run_batch, self.max_size, self.max_wait_s, self.executor = run_batch, max_size, max_wait_s, executor
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """`item`'s result once its batch has run (its exception raised here)."""
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # Everything already waiting joins at once; then up to max_wait_s for more. Clips that
            # arrive while a batch runs wait in the queue and form the next one, so under load
            # batches grow without any waiting, and a lone request never waits longer than max_wait_s.
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_size:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if deadline <= loop.time():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            live = [(item, future) for item, future in batch if not future.done()]  # callers gone: skip their work
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in live])
            except Exception as err:  # the batch function failed as a whole: every caller hears it
                results = [err] * len(live)
            for (_, future), result in zip(live, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
