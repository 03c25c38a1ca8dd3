"""BackgroundTasks: no background loop dies silently. A loop that fails or returns early is logged
and started again after a pause that doubles up to a cap; while it waits, down() names it (and
/ready says 503); restarts are counted; stop() sets the one event, interrupts, and cancels what
does not end in time; one-shot tasks are tracked."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from message_broker.worker.tasks import BackgroundTasks

from ..helpers import eventually

LOGGER = "message_broker.worker.tasks"


def _records(caplog: pytest.LogCaptureFixture, marker: str, loop: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and marker in r.msg and r.args and r.args[0] == loop]


async def test_a_loop_that_raises_is_logged_with_its_traceback_and_restarted_after_doubling_pauses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    tasks = BackgroundTasks(first_backoff=0.02, max_backoff=0.16)
    clock = asyncio.get_running_loop().time
    started: list[float] = []

    async def broken() -> None:
        started.append(clock())
        raise RuntimeError(f"broken for the {len(started)}th time")

    tasks.start("broken", broken)
    await eventually(lambda: len(started) >= 7, interval=0.005)
    await tasks.stop(timeout=1)

    failures = _records(caplog, "failed=yes", "broken")
    assert len(failures) >= 6
    for record in failures:
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
        assert "RuntimeError: broken for the" in caplog.text  # the traceback is in the log
    pauses = [record.args[1] for record in failures[:6]]  # type: ignore[index]
    assert pauses == [0.02, 0.04, 0.08, 0.16, 0.16, 0.16]
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert all(gap >= pause * 0.9 for gap, pause in zip(gaps, pauses, strict=False)), (gaps, pauses)
    assert tasks.restarts["broken"] == len(started) == len(failures)


async def test_a_loop_that_returns_early_is_started_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    tasks = BackgroundTasks(first_backoff=0.01, max_backoff=0.02)
    runs = 0

    async def quits_twice() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            return
        await tasks.stopping.wait()

    tasks.start("quitter", quits_twice)
    await eventually(lambda: runs == 3, interval=0.005)
    await eventually(lambda: tasks.down() == [], interval=0.005)
    assert tasks.restarts["quitter"] == 2
    assert len(_records(caplog, "ended_early=yes", "quitter")) == 2
    await tasks.stop(timeout=1)
    assert runs == 3


async def test_down_names_a_loop_while_it_waits_to_start_again() -> None:
    tasks = BackgroundTasks(first_backoff=0.3, max_backoff=0.3)
    failing = asyncio.Event()
    failing.set()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if failing.is_set():
            raise RuntimeError("not yet")
        await tasks.stopping.wait()

    async def steady() -> None:
        await tasks.stopping.wait()

    tasks.start("flaky", flaky)
    tasks.start("steady", steady)
    assert tasks.names() == ("flaky", "steady")
    await eventually(lambda: runs == 1, interval=0.005)
    # Within the 0.3 s pause, so that it is this failure's wait that down() reports.
    await eventually(lambda: tasks.down() == ["flaky"], timeout=0.2, interval=0.005, what="down() naming flaky")
    assert tasks.down() == ["flaky"]  # failed, waiting 0.3 s
    failing.clear()
    await eventually(lambda: runs == 2, interval=0.005)
    assert tasks.down() == []
    assert tasks.restarts == {"flaky": 1}
    await tasks.stop(timeout=1)
    assert tasks.down() == []  # shutting down is not being down


async def test_the_pause_starts_small_again_after_a_loop_ran_a_good_while(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    tasks = BackgroundTasks(first_backoff=0.01, max_backoff=0.02)  # "a good while": 10 x 0.02 s
    runs = 0

    async def fails_after_running() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await asyncio.sleep(0.3)
        if runs <= 3:
            raise RuntimeError(f"run {runs}")
        await tasks.stopping.wait()

    tasks.start("worker", fails_after_running)
    await eventually(lambda: runs == 4, interval=0.005)
    await tasks.stop(timeout=1)
    pauses = [record.args[1] for record in _records(caplog, "failed=yes", "worker")]  # type: ignore[index]
    assert pauses == [0.01, 0.02, 0.01]


async def test_a_loop_that_raises_cancelled_error_itself_is_restarted(caplog: pytest.LogCaptureFixture) -> None:
    """aiopg raised CancelledError for a cancelled statement: not a reason to end a loop for good."""
    caplog.set_level(logging.ERROR, logger=LOGGER)
    tasks = BackgroundTasks(first_backoff=0.01, max_backoff=0.02)
    runs = 0

    async def cancelled_inside() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise asyncio.CancelledError
        await tasks.stopping.wait()

    tasks.start("cancelled", cancelled_inside)
    await eventually(lambda: runs == 2, interval=0.005)
    assert tasks.restarts["cancelled"] == 1
    assert len(_records(caplog, "failed=yes", "cancelled")) == 1
    await tasks.stop(timeout=1)


async def test_stop_sets_the_event_interrupts_and_cancels_what_does_not_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tasks = BackgroundTasks()
    woken = asyncio.Event()
    interrupted: list[str] = []
    ended: list[str] = []
    cancelled: list[str] = []
    running: set[str] = set()

    async def waits_for_the_event() -> None:
        running.add("polite")
        await tasks.stopping.wait()
        ended.append("polite")

    async def waits_for_its_interrupt() -> None:
        running.add("interruptible")
        await woken.wait()
        ended.append("interruptible")

    async def ignores_everything(name: str) -> None:
        running.add(name)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    def interrupt() -> None:
        interrupted.append("interruptible")
        woken.set()

    def broken_interrupt() -> None:
        interrupted.append("broken")
        raise RuntimeError("cannot interrupt")

    tasks.start("polite", waits_for_the_event)
    tasks.start("interruptible", waits_for_its_interrupt, interrupt=interrupt)
    tasks.start("stubborn", lambda: ignores_everything("stubborn"), interrupt=broken_interrupt)
    tasks.spawn("stubborn one-shot", ignores_everything("stubborn one-shot"))
    await eventually(lambda: len(running) == 4, interval=0.005, what="all four running")

    started = time.monotonic()
    await tasks.stop(timeout=0.2)
    took = time.monotonic() - started

    assert tasks.stopping.is_set()
    assert sorted(interrupted) == ["broken", "interruptible"]
    assert sorted(ended) == ["interruptible", "polite"]
    assert sorted(cancelled) == ["stubborn", "stubborn one-shot"]
    assert 0.2 <= took < 1.5
    assert tasks.spawned == 0
    assert "interrupting background loop=stubborn failed" in caplog.text
    assert "shutdown task=stubborn stopped=no" in caplog.text
    assert tasks.restarts == {}


async def test_a_loop_failing_because_shutdown_interrupted_it_is_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tasks = BackgroundTasks(first_backoff=0.01)
    closed = asyncio.Event()
    runs = 0

    async def reads_a_connection() -> None:
        nonlocal runs
        runs += 1
        await closed.wait()
        raise ConnectionError("connection closed")

    tasks.start("reader", reads_a_connection, interrupt=closed.set)
    await eventually(lambda: runs == 1, interval=0.005, what="the reader running")
    await tasks.stop(timeout=1)
    assert runs == 1 and tasks.restarts == {}
    assert "background loop=reader failed_while_stopping=yes" in caplog.text
    assert "Traceback" not in caplog.text


async def test_spawn_tracks_one_shot_tasks_logs_their_failures_and_stop_waits_for_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    tasks = BackgroundTasks()
    release = asyncio.Event()
    finished: list[str] = []

    async def short() -> None:
        await release.wait()
        finished.append("short")

    async def until_stopping() -> None:
        await tasks.stopping.wait()
        await asyncio.sleep(0.05)  # some last work
        finished.append("long")

    async def failing() -> None:
        raise ValueError("one-shot failed")

    first = tasks.spawn("short", short())
    tasks.spawn("long", until_stopping())
    tasks.spawn("failing", failing())
    assert tasks.spawned == 3
    await eventually(lambda: tasks.spawned == 2, interval=0.005)  # the failing one is done
    assert "background task=failing failed=yes" in caplog.text and "ValueError: one-shot failed" in caplog.text
    release.set()
    await first
    assert tasks.spawned == 1
    await tasks.stop(timeout=2)
    assert finished == ["short", "long"]
    assert tasks.spawned == 0


async def test_two_loops_cannot_share_a_name() -> None:
    tasks = BackgroundTasks()
    tasks.start("once", tasks.stopping.wait)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="once"):
        tasks.start("once", tasks.stopping.wait)  # type: ignore[arg-type]
    await tasks.stop(timeout=1)
