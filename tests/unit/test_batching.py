"""The Coalescer: no caller waits for company, callers arriving meanwhile share the next batch,
and each gets exactly its own result or error."""

from __future__ import annotations

import asyncio

import pytest

from message_broker.batching import Coalescer


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(items)
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_first_caller_runs_at_once_and_later_ones_share_the_next_batch() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, name="t", max_batch=100, max_in_flight=1)
    first = asyncio.create_task(coalescer.submit(0))
    await asyncio.sleep(0)  # the first batch starts with only the first item
    others = [asyncio.create_task(coalescer.submit(i)) for i in range(1, 7)]
    await asyncio.sleep(0)
    assert recorder.batches == [[0]]
    recorder.release.set()
    assert await first == 0
    results = await asyncio.gather(*others, return_exceptions=True)
    assert recorder.batches == [[0], [1, 2, 3, 4, 5, 6]]
    assert [r if isinstance(r, int) else str(r) for r in results] == ["odd 1", 20, "odd 3", 40, "odd 5", 60]
    assert (coalescer.batches, coalescer.largest_batch) == (2, 6)


async def test_max_batch_splits_and_in_flight_limit_holds() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, name="t", max_batch=3, max_in_flight=2)
    tasks = [asyncio.create_task(coalescer.submit(i * 2)) for i in range(8)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert coalescer.in_flight == 2
    recorder.release.set()
    assert await asyncio.gather(*tasks) == [i * 20 for i in range(8)]
    assert all(len(batch) <= 3 for batch in recorder.batches)
    assert sorted(i for batch in recorder.batches for i in batch) == [i * 2 for i in range(8)]


async def test_a_failing_batch_fails_every_caller_in_it_and_the_next_batch_still_runs() -> None:
    calls = 0

    async def run(items: list[int]) -> list[int | Exception]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls == 1:
            raise ConnectionError("database gone")
        return list(items)

    coalescer: Coalescer[int, int] = Coalescer(run, name="t", max_batch=10, max_in_flight=1)
    first = [asyncio.create_task(coalescer.submit(i)) for i in range(3)]
    for task in first:
        with pytest.raises(ConnectionError):
            await task
    assert await coalescer.submit(7) == 7


async def test_a_caller_that_goes_away_does_not_disturb_the_others() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, name="t", max_batch=10, max_in_flight=1)
    leaving = asyncio.create_task(coalescer.submit(2))
    staying = asyncio.create_task(coalescer.submit(4))
    await asyncio.sleep(0)
    leaving.cancel()
    recorder.release.set()
    assert await staying == 40
    assert leaving.cancelled()
    await coalescer.close()


class Stuck(Exception):
    pass


async def test_callers_queued_behind_a_stuck_batch_give_up_and_are_never_run() -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(
        recorder.run, name="t", max_batch=100, max_in_flight=1, queue_timeout=0.05, on_queue_timeout=Stuck
    )
    running = asyncio.create_task(coalescer.submit(0))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(coalescer.submit(i)) for i in (2, 4)]
    done, _ = await asyncio.wait(queued, timeout=5)
    assert done == set(queued)
    assert all(isinstance(task.exception(), Stuck) for task in queued)
    # The running caller is not cut off by the queue timeout: its batch decides its answer.
    assert not running.done()
    recorder.release.set()
    assert await running == 0
    await asyncio.sleep(0)
    assert recorder.batches == [[0]]  # the withdrawn items never reached the database


async def test_a_coalescer_that_is_not_eager_runs_a_second_batch_only_for_a_full_one() -> None:
    started: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        started.append(items)
        await release.wait()
        return items

    coalescer: Coalescer[int, int] = Coalescer(run, name="t", max_batch=3, max_in_flight=2, eager=False)
    first = asyncio.ensure_future(coalescer.submit(1))
    await _settle()
    assert started == [[1]] and coalescer.in_flight == 1
    waiting = [asyncio.ensure_future(coalescer.submit(n)) for n in (2, 3)]
    await _settle()
    assert coalescer.in_flight == 1  # two waiting, not a full batch: they wait for the first
    waiting.append(asyncio.ensure_future(coalescer.submit(4)))
    await _settle()
    assert coalescer.in_flight == 2 and started[1] == [2, 3, 4]  # a full batch: a second slot
    release.set()
    assert await asyncio.gather(first, *waiting) == [1, 2, 3, 4]


async def _settle() -> None:
    """Let every task that is ready run (a few loop turns; nothing here sleeps)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_stalled_batch_does_not_hold_up_the_next_one() -> None:
    """A batch stuck on a lock held elsewhere: callers behind it get a batch of their own once
    it has run for stalled_after, without waiting for a full batch to queue up."""
    stuck = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        if items == [1]:
            await stuck.wait()
        return items

    coalescer: Coalescer[int, int] = Coalescer(
        run, name="t", max_batch=50, max_in_flight=2, eager=False, stalled_after=0.05
    )
    first = asyncio.ensure_future(coalescer.submit(1))
    await _settle()
    assert await asyncio.wait_for(coalescer.submit(2), timeout=5) == 2
    assert not first.done()
    stuck.set()
    assert await first == 1


async def test_linger_gathers_items_until_the_oldest_has_waited_and_close_starts_what_lingers() -> None:
    recorder = Recorder()
    recorder.release.set()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, name="t", max_batch=4, max_in_flight=2, linger=0.05)
    first = [asyncio.create_task(coalescer.submit(i * 2)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert recorder.batches == []  # not full: it lingers
    assert await asyncio.gather(*first) == [0, 20, 40]
    # A full batch does not wait.
    full = [asyncio.create_task(coalescer.submit(i * 2)) for i in range(4)]
    await asyncio.gather(*full)
    assert recorder.batches == [[0, 2, 4], [0, 2, 4, 6]]
    # Closing starts what lingers instead of leaving its callers waiting.
    last = asyncio.create_task(coalescer.submit(8))
    await asyncio.sleep(0)
    await coalescer.close()
    assert await last == 80
    assert recorder.batches[-1] == [8]
