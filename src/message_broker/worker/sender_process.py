"""The webhook sender in a process of its own (WEBHOOK_SENDER=process, the default).

Why: one endpoint gets at most four requests in flight, so its rate is four over the round trip,
and a lane's next request waits for the event loop it runs on. In the process that also takes the
API's requests and applies the tasks, that loop is busy exactly when many events are due (bench
`--only webhooks`, 2,000 tasks/s for 10 s: the backlog emptied 3.5-4.3 s after the load with the
sender inline, 0.1-1.1 s with it in a process of its own, interleaved runs, embedded and over TCP).

    service process                                     sender process
    LISTEN webhook_delivery, reconnects -- stdin "\\n" -> WebhookSender.poke()
    ... its payload "endpoint <id>"    -- stdin "endpoint <id>" -> WebhookSender.endpoint_changed()
    the apply's backlog, begun / ended -- stdin "backlog" / "caught-up" -> WebhookSender.give_way()
    the listener shows the path silent -- stdin "path-silent <s>" -> Pool.abandon_stalled(<s>)
    metrics.observe_webhook            <- stdout lines -- results ("delivered 0.0123", "retry -")
    stopping (or killed): stdin closes --------------->  EOF: stop (what waits is given back,
                                                         attempts in flight get 2 s)

`python -m message_broker send-webhooks` is the child, in a session of its own (signals for the
service's process group are not for it); it takes the service's settings (the database URL as
resolved, an embedded server's included) from MESSAGE_BROKER_SENDER_SETTINGS. It has a small pool
of its own and no LISTEN connection: the service's listener forwards wake-ups, so there is still
one LISTEN connection (and one probe) per service. If the child exits, the service starts another
after a pause (SenderProcess._run, one warning line); what the dead one had claimed comes back
with its leases, as after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

from ..aio import Backoff, wait_for_event
from ..config import Settings
from ..db.driver import Pool
from ..db.options import ConnectionOptions
from ..http.fastpath import dump_task
from ..http.responses import encode_json
from .tasks import BackgroundTasks
from .webhooks import ENDPOINT_CHANGED, SenderSettings, WebhookSender, changed_endpoint

log = logging.getLogger(__name__)

SETTINGS_ENV = "MESSAGE_BROKER_SENDER_SETTINGS"
# Claims, results (two statements at once), the next due time, give-backs.
POOL_SIZE = 4
# After its stdin closes, the child has this long to stop before it is killed.
STOP_GRACE = 5.0
# A child that ran this long before it exited is started again after the shortest pause.
RAN_FOR_A_WHILE = 10.0

# The service's lines to the child: a newline wakes it; these tell it of the apply's backlog.
_BACKLOG = b"backlog\n"
_CAUGHT_UP = b"caught-up\n"
# The service's listener showed the path to the database silent: the child's pool is on that path
# too, and its statements (and idle connections) would otherwise wait out the query limit each.
_PATH_SILENT = "path-silent "

OnResult = Callable[[str, float | None], None]


class SenderProcess:
    """The service's side: starts the child, wakes it, counts its results, stops it."""

    def __init__(self, settings: Settings, tasks: BackgroundTasks, *, on_result: OnResult) -> None:
        self._settings = settings
        self._tasks = tasks
        self._on_result = on_result
        self._stdin: asyncio.StreamWriter | None = None
        self._backlog = False

    def start(self) -> None:
        self._tasks.start("webhook-sender", self._run)

    def poke(self) -> None:
        """Wake the sender: one newline, unless one is still on its way."""
        stdin = self._stdin
        if stdin is not None and not stdin.is_closing() and stdin.transport.get_write_buffer_size() == 0:
            stdin.write(b"\n")

    def endpoint_changed(self, endpoint_id: int) -> None:
        """Tell the child (WebhookSender.endpoint_changed): a line of its own, never dropped."""
        stdin = self._stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(f"{ENDPOINT_CHANGED}{endpoint_id}\n".encode())

    def give_way(self, backlog: bool) -> None:
        """Tell the child that the apply has a backlog, or has caught up (WebhookSender.give_way):
        a line of its own, never dropped as a poke may be."""
        self._backlog = backlog
        stdin = self._stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(_BACKLOG if backlog else _CAUGHT_UP)

    def path_silent(self, older_than: float) -> None:
        """Tell the child that the path to the database went silent (Listener.on_path_silent): its
        pool abandons what it sent more than `older_than` seconds ago and retires its idle
        connections. A line of its own, never dropped."""
        stdin = self._stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(f"{_PATH_SILENT}{older_than!r}\n".encode())

    async def _run(self) -> None:
        """Run the child; one that exits while the service is not stopping is started again."""
        stopping = self._tasks.stopping
        backoff = Backoff(0.1, self._settings.reconnect_max_backoff)
        while not stopping.is_set():
            started = time.monotonic()
            code = await self._run_child()
            if stopping.is_set():
                return
            if time.monotonic() - started > RAN_FOR_A_WHILE:
                backoff.reset()
            pause = backoff.pause()
            log.warning("webhook sender process exited code=%s restart_in_s=%.1f", code, pause)
            await wait_for_event(stopping, pause)

    async def _run_child(self) -> int | None:
        """Start the child and serve it until it exits or the service stops; its exit code."""
        env = {**os.environ, SETTINGS_ENV: json.dumps(dataclasses.asdict(self._settings))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "message_broker",
            "send-webhooks",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            # Signals for the service's process group (a terminal's Ctrl-C, make forwarding
            # SIGTERM) are not for it: the service stops it by closing its stdin, once the
            # requests in flight are done.
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        if self._backlog:
            proc.stdin.write(_BACKLOG)
        log.info("webhook sender process=%d started", proc.pid)
        results = asyncio.create_task(self._read_results(proc.stdout), name="webhook-sender-results")
        exited = asyncio.create_task(proc.wait(), name="webhook-sender-exit")
        stopping = asyncio.create_task(self._tasks.stopping.wait(), name="webhook-sender-stop")
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            self._stdin = None
            if proc.returncode is None:
                proc.stdin.close()  # EOF: the child stops by itself
                done, _ = await asyncio.wait({exited}, timeout=STOP_GRACE)
                if not done:
                    log.warning("webhook sender process=%d killed: not stopped after %.0f s", proc.pid, STOP_GRACE)
                    proc.kill()
                    await exited
            await results  # the lines it wrote before it ended
        return proc.returncode

    async def _read_results(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            result, _, lag = line.decode().partition(" ")
            lag = lag.strip()
            self._on_result(result, None if lag in ("", "-") else float(lag))


def new_sender(pool: Pool, tasks: BackgroundTasks, settings: Settings, on_result: OnResult) -> WebhookSender:
    """The WebhookSender itself, as the child runs it (or the service, WEBHOOK_SENDER=inline)."""
    return WebhookSender(
        pool,
        tasks,
        SenderSettings.from_settings(settings),
        # The API's own serializer and encoder: a webhook's task is GET /api/v1/task/<id>'s.
        dump_task=dump_task,
        encode_json=encode_json,
        on_result=on_result,
    )


# -- the child --------------------------------------------------------------------------------------


def child_main() -> int:
    """`python -m message_broker send-webhooks`: send until stdin closes (or SIGTERM)."""
    from ..logs import configure_logging
    from ..server import new_event_loop

    if SETTINGS_ENV not in os.environ:
        print("message-broker: send-webhooks is started by `serve` (WEBHOOK_SENDER=process)", file=sys.stderr)
        return 2
    settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
    configure_logging(settings.log_level)
    # The results pipe is our stdout as the service opened it; anything else printed goes to stderr.
    results = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    loop = new_event_loop(settings.event_loop)
    try:
        loop.run_until_complete(_send(settings, results))
    finally:
        loop.close()
    return 0


async def _send(settings: Settings, results: BinaryIO) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # sent to this process alone: stop (and be restarted)
        loop.add_signal_handler(signum, stop.set)
    out, written = await loop.connect_write_pipe(_Written, results)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def on_result(result: str, lag: float | None) -> None:
        out.write(f"{result} {'-' if lag is None else repr(lag)}\n".encode())

    # No connection yet: a database that is away now is the sender's to wait for (claim_failed,
    # with backoff), not a reason to exit.
    pool = await Pool.open(
        ConnectionOptions.from_settings(settings),
        min_size=0,
        max_size=POOL_SIZE,
        acquire_timeout=settings.pool_acquire_timeout,
    )
    tasks = BackgroundTasks(max_backoff=settings.reconnect_max_backoff)
    sender = new_sender(pool, tasks, settings, on_result)

    async def wake_ups() -> None:
        while line := await reader.readline():
            if line in (_BACKLOG, _CAUGHT_UP):
                sender.give_way(line == _BACKLOG)
            elif line.startswith(_PATH_SILENT.encode()):
                with contextlib.suppress(ValueError):
                    abandoned = pool.abandon_stalled(float(line[len(_PATH_SILENT) :]))
                    log.warning("webhooks path_silent: abandoned %d statements, idle connections retired", abandoned)
            elif (endpoint_id := changed_endpoint(line.decode(errors="replace").strip())) is not None:
                sender.endpoint_changed(endpoint_id)
            sender.poke()  # any line: a poke the service left out (one on its way) is not lost
        stop.set()  # EOF: the service is stopping, or gone

    reading = asyncio.create_task(wake_ups(), name="wake-ups")
    sender.start()
    try:
        await stop.wait()
    finally:
        reading.cancel()
        await tasks.stop(timeout=settings.shutdown_timeout)
        await pool.close()
        out.close()  # what is buffered is written first
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written.closed, timeout=1.0)


class _Written(asyncio.Protocol):
    """The results pipe; `closed` completes once what was buffered is written (or it broke)."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
