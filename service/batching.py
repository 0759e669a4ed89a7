"""Continuous batching in the entry service: studies that arrive while the model is busy go together in
its next call.

One batch is at the model at a time. A study that finds the model idle is sent at once (no waiting for
batch-mates: a lone study's latency is the model's compute, nothing more); studies that arrive while a
batch runs queue here and leave together, up to `max_batch` per call, as soon as the model is free. Under
load the batches fill by themselves, so throughput grows with concurrency without any timer to tune.

Why not BentoML's adaptive batcher: it learns how long to hold a request for batch-mates from the waits it
observes, and under a burst those waits include the time spent queued behind a running batch; after the
burst it held every lone request ~110 ms for batch-mates that never came (45 ms -> 155 ms per request,
measured with bench/bench_serving.py). A study's result never depends on its batch-mates (fixed view slots
and masks, see cxrlt.inference), so grouping is free to follow arrival order.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Awaitable, Callable


class Batcher:
    def __init__(self, call: Callable[[list], Awaitable[list]], max_batch: int):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.call, self.max_batch = call, int(max_batch)
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._running: asyncio.Task | None = None
        self.sizes: Counter[int] = Counter()  # batch size -> number of model calls

    async def submit(self, item) -> Any:
        """Score one item with whatever else is waiting; returns its result or raises its batch's error."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # drop clients that went away
            if not batch:
                continue
            self.sizes[len(batch)] += 1
            try:
                results = await self.call([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the model answered {len(results)} results for {len(batch)} studies")
            except Exception as e:  # every study of the batch gets the error; the next batch still runs
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    def status(self) -> dict:
        calls = sum(self.sizes.values())
        return {"queued": len(self._queue), "max_batch": self.max_batch, "model_calls": calls,
                "mean_batch": round(sum(k * v for k, v in self.sizes.items()) / calls, 2) if calls else None,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}
