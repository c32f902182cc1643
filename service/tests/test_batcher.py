"""The dynamic batcher: coalescing, batched == single results, bounded queue, expired requests dropped."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import DynamicBatcher
from service.errors import OverloadedError, RequestTimeoutError


def square_rows(items: list) -> dict[str, np.ndarray]:
    """A stand-in encoder: row i is [x, x²] for item x."""
    x = np.asarray(items, np.float32)
    return {"embedding": np.stack([x, x * x], axis=1)}


class Recorder:
    """Wraps an encoder function and records the size of every batch it is called with."""

    def __init__(self, fn=square_rows, delay: float = 0.0):
        self.fn, self.delay, self.sizes = fn, delay, []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items):
        self.release.wait(5)
        time.sleep(self.delay)
        self.sizes.append(len(items))
        return self.fn(items)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_are_coalesced_and_get_their_own_rows():
    recorder = Recorder(delay=0.01)

    async def main():
        batcher = DynamicBatcher("t", recorder, max_batch_size=16, max_wait_ms=20)
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(32)))
        await batcher.close()
        return results

    results = run(main())
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["embedding"], [[i, i * i]])
    assert sum(recorder.sizes) == 32
    assert max(recorder.sizes) == 16 and len(recorder.sizes) <= 4  # 32 callers → a few full batches


def test_batched_result_equals_single_result():
    async def main():
        batcher = DynamicBatcher("t", square_rows, max_batch_size=8, max_wait_ms=10)
        many = await asyncio.gather(*(batcher.submit([i, i + 0.5]) for i in range(10)))
        single = [await batcher.submit([i, i + 0.5]) for i in range(10)]
        await batcher.close()
        return many, single

    many, single = run(main())
    for a, b in zip(many, single, strict=True):
        np.testing.assert_array_equal(a["embedding"], b["embedding"])


def test_full_queue_answers_overloaded_with_retry_after():
    recorder = Recorder()
    recorder.release.clear()  # the encoder blocks: the queue fills up

    async def main():
        batcher = DynamicBatcher("t", recorder, max_batch_size=2, max_wait_ms=0, max_queue=4)
        first = asyncio.ensure_future(batcher.submit([1, 2]))  # taken into a (blocked) batch
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit([i])) for i in range(4)]
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError) as err:
            await batcher.submit([9])
        recorder.release.set()
        await asyncio.gather(first, *queued)
        await batcher.close()
        return err.value

    error = run(main())
    assert error.headers["Retry-After"] == "1"


def test_timed_out_request_is_dropped_not_computed():
    recorder = Recorder()
    recorder.release.clear()

    async def main():
        batcher = DynamicBatcher("t", recorder, max_batch_size=1, max_wait_ms=0, timeout_s=0.1)
        blocking = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.02)
        with pytest.raises(RequestTimeoutError):
            await batcher.submit([2])  # waits behind the blocked batch past its deadline
        recorder.release.set()
        with pytest.raises(RequestTimeoutError):
            await blocking
        await asyncio.sleep(0.05)
        await batcher.close()

    run(main())
    assert recorder.sizes == [1]  # only the first batch ran: the expired request was never computed


def test_encoder_failure_reaches_only_the_failing_caller_and_the_batcher_survives():
    def flaky(items):
        if 13 in items:
            raise ValueError("bad item")
        return square_rows(items)

    async def main():
        batcher = DynamicBatcher("t", flaky, max_batch_size=4, max_wait_ms=20)
        results = await asyncio.gather(batcher.submit([13]), batcher.submit([1]), return_exceptions=True)
        after = await batcher.submit([3])
        await batcher.close()
        return results, after

    (failed, batch_mate), after = run(main())
    assert isinstance(failed, ValueError)
    np.testing.assert_array_equal(batch_mate["embedding"], [[1, 1]])
    np.testing.assert_array_equal(after["embedding"], [[3, 9]])


def refuse_negative(items: list) -> dict[str, np.ndarray]:
    """An encoder that fails the whole call when any item is negative (as a tokenizer fails on one bad text)."""
    if any(x < 0 for x in items):
        raise ValueError("negative input")
    return square_rows(items)


def test_a_poisoned_request_fails_alone_and_its_batch_mates_get_their_rows():
    recorder = Recorder(refuse_negative)
    recorder.release.clear()  # hold the first call so that the rest queue up and share one batch

    async def main():
        batcher = DynamicBatcher("t", recorder, max_batch_size=64, max_wait_ms=50)
        first = asyncio.ensure_future(batcher.submit([1.0]))
        await asyncio.sleep(0.05)
        calls = [batcher.submit([float(i)]) for i in range(2, 10)] + [batcher.submit([-1.0, 3.0])]
        pending = asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.05)
        recorder.release.set()
        results = [await first, *await pending]
        await batcher.close()
        return results

    results = run(main())
    *valid, poisoned = results
    assert isinstance(poisoned, ValueError)
    for i, result in zip([1, *range(2, 10)], valid, strict=True):
        np.testing.assert_array_equal(result["embedding"], [[i, i * i]])
    assert 10 in recorder.sizes, recorder.sizes  # the eight valid and the poisoned request did share a batch


def test_a_backlog_goes_at_once_instead_of_waiting_for_stragglers():
    """Requests that queued while a batch ran form the next batch without waiting `max_wait`: a request sent
    after that batch was taken runs in a batch of its own."""
    recorder = Recorder(delay=0.0)
    recorder.release.clear()

    async def main():
        batcher = DynamicBatcher("t", recorder, max_batch_size=64, max_wait_ms=1000)
        warm = [asyncio.ensure_future(batcher.submit([float(i)])) for i in range(2)]  # under load: last batch > 1
        await asyncio.sleep(0.05)
        backlog = [asyncio.ensure_future(batcher.submit([float(i)])) for i in range(2, 7)]
        await asyncio.sleep(0.05)
        recorder.release.set()
        await asyncio.gather(*warm)
        while not batcher._queue.empty():  # the collector has taken the backlog
            await asyncio.sleep(0.001)
        straggler = await batcher.submit([7.0])
        await asyncio.gather(*backlog)
        await batcher.close()
        return straggler

    straggler = run(main())
    np.testing.assert_array_equal(straggler["embedding"], [[7, 49]])
    assert recorder.sizes == [2, 5, 1], recorder.sizes
