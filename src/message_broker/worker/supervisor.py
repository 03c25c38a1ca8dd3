"""The supervisor: one coroutine per user with pending work, woken by LISTEN task_created.

    this process's insert committed ----> stored(pid, users) --> wake(each) --> UserLoop (started if absent)
    listener --task_created(user_id)----> wake(user_id), unless it is the echo of such an insert
    start-up / reconnect / sweep --------> users_with_pending_tasks --> wake(each)

A task this process stores wakes its user's loop at once, in process: waiting for the NOTIFY to come
back through the LISTEN connection cost a trip through the server and a wake-up. The NOTIFY still
goes out (other processes hear of the task by it), and its echo here is known by the pid of the
server process that inserted (the insert returns it: behind PgBouncer the client connection's own
pid is the pooler's), and skipped: the loop already looked after that commit.

A transaction that finishes tasks some request of this process waits for (`?wait`) reads them back
right after its COMMIT, in the same round trip, and answers those requests itself; tasks applied by
another process reach them through the task_processed notifications (worker/feed.py).

The supervisor also keeps what this process remembers of its users' accounts (account_memory.py):
the tasks it stored, the accounts its applies left, and news that another process stored a task
for one of them; with that, an apply can take one round trip instead of two (db/apply.py).

No polling: an idle service only runs the listener's probe and the low-frequency safety sweep,
which catches tasks whose notification was lost (e.g. inserted with triggers disabled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from ..aio import Backoff, wait_for_event
from ..batching import Coalescer
from ..config import Settings
from ..db import apply, repository
from ..db.driver import Notification, Pool
from ..db.errors import DatabaseError
from ..db.listener import Listener
from ..models import AppliedBatch, Task
from .account_memory import AccountMemory
from .tasks import BackgroundTasks
from .user_loop import BatchDone, UserLoop
from .waiters import TaskWaiters

log = logging.getLogger(__name__)

TASK_CREATED = "task_created"
# An echo comes back within milliseconds of its commit: an expected echo older than this is taken
# as lost (the notification that then comes is not skipped), and a notification heard this long ago
# as no longer the echo of an insert still waiting for its answer.
_ECHO_WINDOW = 5.0
_PRUNE_ABOVE = 10_000  # entries, before the old ones are dropped
# Notifications kept per (backend pid, user) not taken as an echo: more than a few inserts' echoes
# never come before their answers (the rest are other processes' tasks: a wake-up each already).
_HEARD_PER_KEY = 16


class Supervisor:
    def __init__(
        self,
        pool: Pool,
        listener: Listener,
        tasks: BackgroundTasks,
        settings: Settings,
        *,
        on_applied: Callable[[AppliedBatch], None] | None = None,
        waiters: TaskWaiters | None = None,
        on_backlog: Callable[[bool], None] | None = None,
    ) -> None:
        self._pool = pool
        self._tasks = tasks
        self._on_applied = on_applied  # e.g. the metrics
        self._waiters = waiters
        self._on_backlog = on_backlog  # the webhook sender gives way while there is one
        self._settings = settings
        self._loops: dict[int, UserLoop] = {}
        self.memory = AccountMemory(settings.batch_size)
        # Server processes this process's inserts went through: a task_created from any other is
        # another process's task (behind a pooler one may be shared: a guess gone wrong costs a
        # round trip, see account_memory.py).
        self._own_pids: set[int] = set()
        # At most worker_concurrency transactions in flight (leaving the rest of the pool to
        # requests), and more than one only for a backlog; users whose loops ask meanwhile share
        # the next transaction.
        self._applier: Coalescer[int, BatchDone] = Coalescer(
            self._apply_users,
            name="apply",
            max_batch=settings.apply_max_users,
            max_in_flight=settings.worker_concurrency,
            eager=False,
        )
        self._rescan = asyncio.Event()
        self.scans = 0  # completed scans for pending work (start-up, reconnects, sweeps)
        self.tasks_applied = 0  # by this process
        self.sweeps_with_missed_work = 0
        self.apply_transactions = 0  # looks at the database for users' pending tasks
        self.empty_applies = 0  # ... that found none
        self.applies_from_memory = 0  # ... in one round trip, from what this process remembered
        self.memory_differed = 0  # ... tried so, and the database held something else
        self.echoes_skipped = 0
        self.backlogged = False  # as of the latest apply transaction (see _note_backlog)
        self.backlogs = 0  # that began
        # (backend pid, user id) -> (echoes of our own commits not heard yet, when the last was
        # committed); and -> when each notification that was no expected echo was heard, oldest
        # first (see stored()): one for each, as two inserts' echoes can both come before their answers.
        self._expected: dict[tuple[int, int], tuple[int, float]] = {}
        self._heard: dict[tuple[int, int], list[float]] = {}
        # When those were last cleared (a reconnect, a flood): an insert sent before then may have
        # been heard, or lost, in what was cleared.
        self._cleared_at = 0.0
        # Users with an insert of this process on its way, and those of them a notification asked
        # to wake meanwhile (see storing()).
        self._storing: dict[int, int] = {}
        self._wake_when_stored: set[int] = set()
        # ... and the server processes not known as ours that notified for them meanwhile: the
        # insert's answer tells whether that was its own echo (a pool connection's first insert)
        # or another process's task.
        self._unknown_while_storing: dict[int, set[int]] = {}
        listener.route(TASK_CREATED, self._task_created)
        listener.on_connected(self._connected)

    def start(self) -> None:
        self._tasks.start("sweep", self._sweep_loop, interrupt=self._stopping)

    def _stopping(self) -> None:
        """Shutdown began: the sweep and every idle user loop stop waiting (a loop mid-transaction
        finishes it first), so that a graceful stop does not wait out USER_IDLE_TIMEOUT."""
        self._rescan.set()
        for loop in list(self._loops.values()):
            loop.wake()

    async def close(self) -> None:
        """After the background tasks have stopped: a transaction whose loop was cancelled still
        runs to its commit or rollback."""
        await self._applier.close(timeout=1.0)

    @property
    def active_users(self) -> int:
        return len(self._loops)

    @property
    def echoes_expected(self) -> int:
        """task_created notifications of this process's own commits not heard back yet."""
        return sum(count for count, _ in self._expected.values())

    # -- waking users --------------------------------------------------------------------------

    def wake(self, user_id: int, *, retry_now: bool = False) -> bool:
        """Wake the user's loop, starting one if there is none; True if a loop was started.
        `retry_now`: the database is back, a loop pausing after a failure tries again at once."""
        if self._tasks.stopping.is_set():
            return False
        loop = self._loops.get(user_id)
        if loop is not None:
            loop.wake(retry_now=retry_now)
            return False
        loop = UserLoop(
            user_id,
            self._applier.submit,
            idle_timeout=self._settings.user_idle_timeout,
            stop=self._tasks.stopping,
            retire=self._retire,
            max_backoff=self._settings.reconnect_max_backoff,
            batch_size=self._settings.batch_size,
        )
        self._loops[user_id] = loop
        self._tasks.spawn(f"user-{user_id}", loop.run())
        return True

    @contextlib.contextmanager
    def storing(self, user_ids: Iterable[int | None]) -> Iterator[None]:
        """Around an insert of this process for these users. A task_created heard meanwhile for one
        of them is often the insert's own echo, read before its answer: the loop is woken when the
        answer comes (stored(), which tells the loop's memory of the task first, so that its apply
        can take one round trip), or when the insert ends otherwise, not before."""
        users = {user_id for user_id in user_ids if user_id is not None}
        for user_id in users:
            self._storing[user_id] = self._storing.get(user_id, 0) + 1
        try:
            yield
        finally:
            for user_id in users:
                left = self._storing.pop(user_id) - 1
                if left:
                    self._storing[user_id] = left
                    continue
                self._judge_unknown_pids(user_id)  # an insert that failed tells nothing
                if user_id in self._wake_when_stored:
                    self._wake_when_stored.discard(user_id)
                    self.wake(user_id)

    def _judge_unknown_pids(self, user_id: int) -> None:
        """A task_created heard while storing from a server process that none of this process's
        inserts has used, and that no insert of this user still on its way can turn out to have
        used, was another process's task: the account may differ from what is remembered."""
        unknown = self._unknown_while_storing.get(user_id)
        if unknown is None:
            return
        unknown -= self._own_pids
        if unknown and self._storing.get(user_id, 0) <= 1:
            self.memory.changed_elsewhere(user_id)
            unknown.clear()
        if not unknown:
            del self._unknown_while_storing[user_id]

    def stored(self, pid: int, tasks: Iterable[Task], sent_at: float) -> None:
        """Tasks of these users were committed by this process through server process `pid`, by a
        statement sent at `sent_at` (time.monotonic()): wake their loops now, and skip the echo of
        that commit's task_created (one per user: the trigger notifies each user once).

        The echo can also come first (the LISTEN connection's answer is read before the insert's):
        one heard from that backend since `sent_at` is this commit's, as the connection ran nothing
        else meanwhile. It has woken the loop already, or (inside storing()) left that to now."""
        now = time.monotonic()
        if len(self._expected) > _PRUNE_ABOVE or len(self._heard) > _PRUNE_ABOVE:
            self._prune(now)
        if len(self._own_pids) > _PRUNE_ABOVE:
            self._own_pids.clear()
        self._own_pids.add(pid)
        tasks = list(tasks)
        self.memory.stored(tasks)
        for user_id in {task.user_id for task in tasks}:
            self._judge_unknown_pids(user_id)
            key = (pid, user_id)
            waited = user_id in self._wake_when_stored  # a notification came inside storing()
            self._wake_when_stored.discard(user_id)  # woken here, whichever way
            if self._heard_since(key, sent_at):
                if waited:
                    self.wake(user_id)
                continue
            if sent_at <= self._cleared_at:
                # Its echo may have been lost while the LISTEN connection was down: expecting it
                # would swallow the next notification of that user from that server process (a
                # hold's release, which nothing else wakes). A wake-up too many at worst.
                self.wake(user_id)
                continue
            count, _ = self._expected.get(key, (0, 0.0))
            self._expected[key] = (count + 1, now)
            self.wake(user_id)

    def _heard_since(self, key: tuple[int, int], sent_at: float) -> bool:
        """Take the first notification heard from that backend for that user since `sent_at`, if
        any: the echo of the commit of a statement sent then. Each is taken once: an insert whose
        answer comes after the next insert's echo (its connection went back to the pool before its
        answer was handled) takes its own, and leaves the next one's to it, not an echo to expect
        that came already (it would swallow the next notification of that user from that backend,
        such as a hold's release, which nothing else wakes)."""
        heard = self._heard.get(key)
        if heard is None:
            return False
        for index, at in enumerate(heard):
            if at >= sent_at:
                del heard[index]
                if not heard:
                    del self._heard[key]
                return True
        return False

    def _prune(self, now: float) -> None:
        """Forget what is older than the window; if that is not enough (a flood of notifications),
        everything: the cost is a wake-up too many, or an echo not skipped."""
        self._expected = {k: v for k, v in self._expected.items() if now - v[1] <= _ECHO_WINDOW}
        recent = {k: [at for at in heard if now - at <= _ECHO_WINDOW] for k, heard in self._heard.items()}
        self._heard = {k: heard for k, heard in recent.items() if heard}
        if len(self._expected) > _PRUNE_ABOVE // 2:
            self._expected.clear()
        if len(self._heard) > _PRUNE_ABOVE // 2:
            self._heard.clear()
            self._cleared_at = now

    def _connected(self) -> None:
        # Notifications sent while the LISTEN connection was down are lost, echoes included.
        self._expected.clear()
        self._heard.clear()
        self._cleared_at = time.monotonic()
        self.memory.forget_all()
        self._rescan.set()

    def _retire(self, loop: UserLoop) -> None:
        if self._loops.get(loop.user_id) is loop:
            del self._loops[loop.user_id]
            self.memory.loop_retired(loop.user_id)

    def _task_created(self, notification: Notification) -> None:
        try:
            user_id = int(notification.payload)
        except ValueError:
            log.warning("notification ignored channel=task_created payload=%r", notification.payload[:200])
            return
        key, now = (notification.pid, user_id), time.monotonic()
        expected = self._expected.pop(key, None)
        if expected is not None and now - expected[1] <= _ECHO_WINDOW:
            # Our own insert's: its user's loop was woken when it committed.
            if expected[0] > 1:
                self._expected[key] = (expected[0] - 1, expected[1])
            self.echoes_skipped += 1
            return
        if len(self._heard) > _PRUNE_ABOVE:
            self._prune(now)
        heard = self._heard.setdefault(key, [])
        heard.append(now)
        while now - heard[0] > _ECHO_WINDOW or len(heard) > _HEARD_PER_KEY:  # another process's, mostly
            del heard[0]
        if user_id in self._storing:
            if notification.pid not in self._own_pids:
                self._unknown_while_storing.setdefault(user_id, set()).add(notification.pid)
            self._wake_when_stored.add(user_id)  # see storing()
            return
        if notification.pid not in self._own_pids:
            self.memory.changed_elsewhere(user_id)
        self.wake(user_id)

    async def _apply_users(self, user_ids: list[int]) -> list[BatchDone]:
        started = time.perf_counter()
        waiters = self._waiters
        # Asked when the writes are sent: a request that began waiting meanwhile is answered too.
        wanted = waiters.is_waited if waiters is not None else _nobody
        self.apply_transactions += 1
        memory = self.memory
        remembered = memory.remembered(user_ids)
        before = memory.apply_started(user_ids)
        try:
            batch = await apply.apply_pending_batches(
                self._pool, user_ids, self._settings.batch_size, wanted, remembered
            )
        except BaseException:
            memory.apply_failed(before)
            raise
        memory.applied(before, batch)
        if remembered is not None:
            self.applies_from_memory += batch.remembered
            self.memory_differed += not batch.remembered
        if waiters is not None:
            for task in batch.waited:
                waiters.finished(task)
            waiters.applied(batch.task_types)
        if not batch.task_types:
            self.empty_applies += 1
        else:
            self.tasks_applied += len(batch.task_types)
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.debug("batch applied users=%d tasks=%d ms=%.2f", len(user_ids), len(batch.task_types), elapsed_ms)
            if self._on_applied is not None:
                self._on_applied(batch)
        done = [BatchDone(len(batch.outcomes[user_id]), user_id in batch.deferred) for user_id in user_ids]
        self._note_backlog(done)
        return done

    def _note_backlog(self, done: list[BatchDone]) -> None:
        """After each apply transaction: is there a backlog? It begins when more users wait for
        the apply than every transaction at once could take, and ends when not one full
        transaction's worth waits any more; a user with a full batch (more of its tasks wait) is
        one too. Not a moment's queue under a steady load: at 2,000 tasks/s of 1,000 users one
        transaction's worth waited now and then. The last transaction to end decides, and it
        sees the queue as the work ends."""
        settings = self._settings
        waiting = settings.apply_max_users * (1 if self.backlogged else settings.worker_concurrency)
        backlogged = self._applier.queued >= waiting or any(result.applied >= settings.batch_size for result in done)
        if backlogged == self.backlogged:
            return
        self.backlogged = backlogged
        self.backlogs += backlogged
        log.debug("apply backlog=%s", "yes" if backlogged else "no")
        if self._on_backlog is not None:
            self._on_backlog(backlogged)

    # -- the safety net ------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        """Wake every user with pending tasks: after each (re)connect of the listener, and every
        sweep_interval in case a notification was lost anyway."""
        retry = Backoff(0.5, self._settings.reconnect_max_backoff)
        stopping = self._tasks.stopping
        while not stopping.is_set():
            rescan = await wait_for_event(self._rescan, self._settings.sweep_interval)
            if stopping.is_set():
                return
            self._rescan.clear()
            try:
                user_ids = await repository.users_with_pending_tasks(self._pool)
            except DatabaseError as exc:
                pause = retry.pause()
                log.warning("scan failed error=%r retry_in_s=%.1f", str(exc), pause)
                await wait_for_event(stopping, pause)
                self._rescan.set()
                continue
            retry.reset()
            self.scans += 1
            # A scan after a (re)connect means the database is back: no loop waits out its pause.
            started = sum(self.wake(user_id, retry_now=rescan) for user_id in user_ids)
            if started and not rescan:
                self.sweeps_with_missed_work += 1
                log.warning("sweep found_missed_work=yes users=%d", started)
            elif user_ids:
                log.info("scan users_with_pending=%d", len(user_ids))


def _nobody(task_id: int) -> bool:
    return False
