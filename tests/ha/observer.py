"""An observer that LISTENs on task_processed through the HA endpoint and counts notifications per
task id, reconnecting after every failover (notifications are not replicated, and LISTEN is refused
on a standby, so after a failover it must reach the new primary and LISTEN again).

It hears nothing while it is disconnected, so it cannot show that every finished task was heard; what
it can show is that no task was heard finishing twice. PostgreSQL delivers a notification only once
its transaction is no longer in progress (a commit waiting for the synchronous standby still is), so a
task heard twice was finished by two transactions that both committed."""

from __future__ import annotations

import contextlib
import json
import select
import threading
import time
from collections import Counter

import psycopg2
import psycopg2.extensions


class ReconnectingObserver:
    def __init__(self, dsn: str, channel: str = "task_processed") -> None:
        self._dsn = dsn
        self._channel = channel
        self.seen: Counter[int] = Counter()
        self.connects = 0
        self.last_heard = 0.0  # time.monotonic() of the last notification
        self.failures: Counter[str] = Counter()  # why a connection was lost or refused
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ha-observer", daemon=True)
        self._listening = threading.Event()

    def __enter__(self) -> ReconnectingObserver:
        self._thread.start()
        if not self._listening.wait(20):
            raise AssertionError(f"the observer could not LISTEN within 20 s: {dict(self.failures)}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def twice(self) -> list[int]:
        return sorted(task_id for task_id, count in self.seen.items() if count > 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = None
            try:
                conn = psycopg2.connect(self._dsn, connect_timeout=3, application_name="ha observer")
                conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {self._channel}")  # refused on a standby (SQLSTATE 25006)
                self.connects += 1
                self._listening.set()
                while not self._stop.is_set():
                    if select.select([conn], [], [], 0.2)[0]:
                        conn.poll()
                        for notification in conn.notifies:
                            self.seen[int(json.loads(notification.payload)["id"])] += 1
                        if conn.notifies:
                            self.last_heard = time.monotonic()
                        conn.notifies.clear()
            except psycopg2.Error as exc:
                self.failures[type(exc).__name__] += 1
                time.sleep(0.1)  # the pause between attempts to reconnect, not a synchronisation
            finally:
                if conn is not None:
                    with contextlib.suppress(psycopg2.Error):
                        conn.close()
