"""Dynamic batching: concurrent requests for one model and modality are coalesced into one encoder call.

Callers `await batcher.submit(items)`; a collector task takes up to `max_batch_size` items (those already queued,
and, while the service is under load, whatever arrives within `max_wait_ms`: a lone request is not held back
waiting for company that will not come), runs the batch in a worker thread (off the event loop) and
resolves each caller's future with its rows. The queue is bounded (OverloadedError → 429 with Retry-After), and a
request whose deadline passed while queued is dropped instead of computed. Inputs are validated before they
are submitted; should a batch still fail, its requests are run one by one, so one caller's bad input never fails
another caller's request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from service.errors import OverloadedError, RequestTimeoutError

logger = logging.getLogger(__name__)

BatchFn = Callable[[list], dict[str, np.ndarray]]  # items → {"embedding": (B, D), ...}


@dataclasses.dataclass
class _Request:
    items: list
    future: asyncio.Future
    deadline: float


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What the metrics want to know about each executed batch."""

    name: str
    size: int
    seconds: float


class DynamicBatcher:
    """Coalesces `submit` calls into batches of at most `max_batch_size` items for `fn`."""

    def __init__(self, name: str, fn: BatchFn, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, timeout_s: float = 30.0,
                 on_batch: Callable[[BatchStats], None] | None = None):
        self.name, self.fn = name, fn
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.on_batch = on_batch or (lambda stats: None)
        self._queue: asyncio.Queue[_Request] | None = None
        self._pending_items = 0
        self._last_batch_size = 0  # > 1: requests are arriving concurrently, so waiting pays
        self._task: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        """Items waiting (not yet in a running batch)."""
        return self._pending_items

    async def submit(self, items: Sequence) -> dict[str, np.ndarray]:
        """Encode `items` as part of some batch; rows come back in input order."""
        self._ensure_started()
        if self._pending_items + len(items) > self.max_queue:
            raise OverloadedError(f"{self.name} queue is full ({self.max_queue} items); retry shortly",
                                  headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        request = _Request(list(items), loop.create_future(), time.monotonic() + self.timeout_s)
        self._pending_items += len(items)
        self._queue.put_nowait(request)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.timeout_s)
        except asyncio.CancelledError:
            request.future.cancel()  # the caller went away: don't compute it
            raise
        except TimeoutError as err:
            request.future.cancel()
            raise RequestTimeoutError(f"{self.name} inference timed out after {self.timeout_s:g}s") from err

    def _ensure_started(self) -> None:
        """Start the collector on the running loop the first time it is needed."""
        if self._task is None or self._task.done():
            self._queue = self._queue or asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect_forever())

    async def close(self) -> None:
        """Stop the collector; queued requests fail."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            request = self._queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(RequestTimeoutError(f"{self.name} is shutting down"))

    async def _collect_forever(self) -> None:
        """Take batches off the queue and run them one at a time (the encoder uses every core already)."""
        while True:
            batch = await self._next_batch()
            batch = self._drop_expired(batch)
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Request]:
        """The first waiting request plus what is queued; under load, a request that finds no company queued
        waits up to `max_wait` for some. A backlog (what queued while the last batch ran) goes at once: waiting
        for stragglers then only leaves the encoder idle."""
        first = await self._queue.get()
        batch, size = [first], len(first.items)
        alone = self._queue.empty()
        deadline = time.monotonic() + (self.max_wait if self._last_batch_size > 1 and alone else 0.0)
        while size < self.max_batch_size:
            request = await self._get_until(deadline)
            if request is None:
                break
            batch.append(request)
            size += len(request.items)
        self._pending_items -= size
        self._last_batch_size = len(batch)
        return batch

    async def _get_until(self, deadline: float) -> _Request | None:
        """The next request if one is queued before `deadline` (returns at once if one is already waiting)."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), remaining)
        except TimeoutError:
            return None

    def _drop_expired(self, batch: list[_Request]) -> list[_Request]:
        """Requests whose caller already gave up (deadline passed or cancelled) are not computed."""
        now = time.monotonic()
        live = [r for r in batch if not r.future.done() and r.deadline > now]
        if len(live) < len(batch):
            logger.info("%s: dropped %d expired request(s)", self.name, len(batch) - len(live))
        return live

    async def _run(self, batch: list[_Request]) -> None:
        """One encoder call for the whole batch in a worker thread; each future gets its own rows."""
        items = [item for request in batch for item in request.items]
        start = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self.fn, items)
        except Exception as err:
            if len(batch) == 1:
                logger.exception("%s: batch of %d failed", self.name, len(items))
                _settle(batch[0], error=err)
                return
            # one request's items broke the batch: run each request alone, so only the offender fails
            logger.warning("%s: batch of %d requests failed (%s); running them one by one", self.name,
                           len(batch), err)
            for request in batch:
                await self._run([request])
            return
        self.on_batch(BatchStats(self.name, len(items), time.perf_counter() - start))
        offset = 0
        for request in batch:
            n = len(request.items)
            if not request.future.done():
                request.future.set_result({k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n


def _settle(request: _Request, result: dict | None = None, error: Exception | None = None) -> None:
    """Resolve a caller's future unless it gave up already."""
    if request.future.done():
        return
    if error is not None:
        request.future.set_exception(error)
    else:
        request.future.set_result(result)
