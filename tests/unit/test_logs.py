"""logs.RepeatSummarizer: a run of like warnings is one line per window, and every warning is
accounted for, the ones of the last window too (once the window has passed, even if no other
warning comes)."""

from __future__ import annotations

import logging
import time

from message_broker.logs import AUDIT, RepeatSummarizer, flush_summaries

from ..helpers import accounted, wait_until


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def _logger(window: float) -> tuple[logging.Logger, Lines, RepeatSummarizer]:
    lines = Lines()
    summarizer = RepeatSummarizer(window, emit=lines.handle)
    lines.addFilter(summarizer)
    logger = logging.getLogger(f"test_logs.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(lines)
    return logger, lines, summarizer


def test_a_burst_is_its_first_line_and_one_summary_once_the_window_has_passed() -> None:
    logger, lines, _ = _logger(window=0.3)
    for n in range(50):
        logger.warning("request path=%s status=503", f"/api/{n}")
    assert lines.lines == ["WARNING request path=/api/0 status=503"]
    # Nothing else is logged: the held-back count comes out on its own when the window ends.
    wait_until(lambda: len(lines.lines) == 2, 5, "the summary")
    assert lines.lines[1] == (
        "WARNING request path=/api/49 status=503 (and 48 more like it in the last 0 s, not logged)"
    )
    assert accounted(lines.lines) == 50
    time.sleep(0.4)
    assert len(lines.lines) == 2  # nothing more to say


def test_audit_lines_are_each_written() -> None:
    logger, lines, _ = _logger(window=5.0)
    for n in range(4):
        logger.warning("api_token created id=%s name=%r", n, f"t{n}", extra=AUDIT)
    assert lines.lines == [f"WARNING api_token created id={n} name='t{n}'" for n in range(4)]


def test_a_long_run_is_one_line_per_window_and_every_warning_is_accounted_for() -> None:
    logger, lines, _ = _logger(window=0.2)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        logger.warning("request path=%s status=503", "/x")
        sent += 1
        time.sleep(0.001)
    wait_until(lambda: accounted(lines.lines) == sent, 5, "every warning accounted for")
    assert 4 <= len(lines.lines) <= 8, lines.lines  # about one per 0.2 s window, not ~700


def test_only_like_warnings_are_held_back() -> None:
    logger, lines, summarizer = _logger(window=60)
    logger.warning("listen lost error=%r", "a")
    logger.warning("listen lost error=%r", "b")
    logger.warning("request status=503 path=%s", "/y")
    logger.error("request status=500 path=%s", "/z")
    logger.error("request status=500 path=%s", "/z")
    logger.info("batch applied users=%d", 1)
    logger.info("batch applied users=%d", 2)
    assert lines.lines == [
        "WARNING listen lost error='a'",
        "WARNING request status=503 path=/y",
        "ERROR request status=500 path=/z",
        "ERROR request status=500 path=/z",
        "INFO batch applied users=1",
        "INFO batch applied users=2",
    ]
    summarizer.flush()  # what exit does: the held-back one is written now, not in 60 s
    assert lines.lines[-1] == "WARNING listen lost error='b'"
    summarizer.flush()
    assert len(lines.lines) == 7


def test_the_next_like_warning_after_the_window_says_how_many_were_held_back() -> None:
    logger, lines, _ = _logger(window=0.2)
    for _ in range(3):
        logger.warning("probe failed")
    logger.warning("probe failed")
    wait_until(lambda: len(lines.lines) == 2, 5, "the summary of the first window")
    time.sleep(0.25)
    logger.warning("probe failed")  # a new window: through at once
    assert lines.lines[-1] == "WARNING probe failed"
    assert accounted(lines.lines) == 5


def test_a_flush_already_under_way_when_the_next_window_opens_writes_nothing() -> None:
    """The window's flush timer fires just as a like warning opens the next window (the timer's
    thread is waiting for the lock while the warning goes through, saying how many were held). The
    next window's first held warning must wait for that window's end, not go out at once."""
    logger, lines, summarizer = _logger(window=0.3)
    logger.warning("probe failed")
    logger.warning("probe failed")  # held: a flush is set for the window's end
    (stale, _token) = next(iter(summarizer._timers.values()))
    stale.cancel()  # it is run by hand below, late, as the race has it
    time.sleep(0.35)
    logger.warning("probe failed")  # the next window: through at once, with the count
    logger.warning("probe failed")  # held in the next window
    assert lines.lines == [
        "WARNING probe failed",
        "WARNING probe failed (and 1 more like it in the last 0 s, not logged)",
    ]
    stale.function(*stale.args)  # the late flush of the first window
    assert len(lines.lines) == 2, lines.lines
    wait_until(lambda: len(lines.lines) == 3, 5, "the second window's summary")
    assert accounted(lines.lines) == 4


def test_flush_summaries_writes_the_held_counts_before_a_last_line() -> None:
    """What `serve` calls before "stopped" or the reason it gives up, so that it stays the last line."""
    lines = Lines()
    lines.addFilter(RepeatSummarizer(60, emit=lines.handle))
    root = logging.getLogger()
    root.addHandler(lines)
    try:
        logger = logging.getLogger(f"test_logs.{time.monotonic_ns()}")
        logger.setLevel(logging.INFO)
        for n in range(3):
            logger.warning("request path=%s status=503", f"/api/{n}")
        flush_summaries()
        logger.info("stopped")
    finally:
        root.removeHandler(lines)
    assert lines.lines == [
        "WARNING request path=/api/0 status=503",
        "WARNING request path=/api/2 status=503 (and 1 more like it in the last 0 s, not logged)",
        "INFO stopped",
    ]
