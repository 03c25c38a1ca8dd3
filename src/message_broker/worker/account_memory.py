"""What this process remembers of the accounts its user loops apply, so that an apply can skip the
round trip that locks and reads them (db/apply.py, finish_as_remembered).

For each user it keeps the account as this process's last apply left it, and the tasks this
process stored since (their inserts returned them whole). A remembered user whose pending
tasks are all plain balance changes can be applied from memory. Memory is only a guess: the
database writes from it only if it holds exactly what is remembered, and otherwise the apply reads
as usual. So every rule here is about guessing well, none about money:

- an apply that read everything pending (a batch neither full nor cut short) makes the account
  remembered; one that found more, failed, or was overtaken by news of the user makes it not;
- a task another process stored for the user (its task_created heard), or a transfer's credit
  this process wrote to the user from another user's batch, makes it not remembered;
- the LISTEN connection reconnecting (what was missed is unknown) forgets every account.

An account outlives its user's loop (a user with a task every few seconds gets a new loop for
each), up to the `_AT_MOST` last applied; its news is still heard, as every task_created is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..db.apply import Remembered
from ..ledger import Account, PendingTask, Status, TaskType
from ..models import AppliedBatch, Task

# The kinds whose rules read nothing but the account (no recipient, no hold).
_PLAIN = frozenset({TaskType.REPLENISHMENT, TaskType.WRITE_OFF})
# Accounts remembered at most (about 100 bytes each), the least recently applied dropped first.
_AT_MOST = 10_000


class ApplyStarted(NamedTuple):
    """Taken as an apply is sent: the tasks known then, and the count of news so far."""

    known: dict[int, frozenset[int]]
    news: int


class AccountMemory:
    def __init__(self, batch_size: int) -> None:
        self._batch_size = batch_size
        self._accounts: dict[int, Account] = {}  # remembered users only
        self._pending: dict[int, dict[int, PendingTask]] = {}  # tasks stored here, not seen applied
        # News that came while a user's apply was under way, numbered: an apply sent before the
        # latest news of one of its users does not make that user remembered.
        self._news = 0
        self._news_of: dict[int, int] = {}  # users with an apply under way only
        self._applying: set[int] = set()

    def stored(self, tasks: Iterable[Task]) -> None:
        """Tasks this process stored (committed)."""
        for task in tasks:
            if task.status is Status.PENDING:
                self._pending.setdefault(task.user_id, {})[task.id] = PendingTask(
                    task.id,
                    task.type,
                    task.amount,
                    task.counterparty_id,
                    task.hold_id,
                    task.created_at,
                    task.expires_at,
                )

    def changed_elsewhere(self, user_id: int) -> None:
        """Something this process did not do changed, or may change, the user's account or tasks."""
        self._accounts.pop(user_id, None)
        if user_id in self._applying:  # what that apply leaves is not to be remembered either
            self._news += 1
            self._news_of[user_id] = self._news

    def forget_all(self) -> None:
        """Every account may have changed unheard (the LISTEN connection was down)."""
        for user_id in [*self._accounts, *self._applying]:
            self.changed_elsewhere(user_id)

    def loop_retired(self, user_id: int) -> None:
        """The user's loop retired (nothing pending as far as it knew, nothing under way): the
        account stays remembered."""
        self._pending.pop(user_id, None)

    def remembered(self, user_ids: Sequence[int]) -> Remembered | None:
        """The users' accounts and pending tasks, if every one of them can be applied from memory."""
        accounts: dict[int, Account] = {}
        pending: dict[int, list[PendingTask]] = {}
        for user_id in user_ids:
            account, tasks = self._accounts.get(user_id), self._pending.get(user_id)
            if account is None or not tasks or len(tasks) > self._batch_size:
                return None
            if any(task.type not in _PLAIN for task in tasks.values()):
                return None
            accounts[user_id] = account
            pending[user_id] = [tasks[task_id] for task_id in sorted(tasks)]
        return Remembered(accounts, pending)

    def apply_started(self, user_ids: Sequence[int]) -> ApplyStarted:
        self._applying.update(user_ids)
        known = {user_id: frozenset(self._pending.get(user_id, ())) for user_id in user_ids}
        return ApplyStarted(known, self._news)

    def apply_failed(self, started: ApplyStarted) -> None:
        for user_id in started.known:
            self._accounts.pop(user_id, None)
            self._news_of.pop(user_id, None)
        self._applying.difference_update(started.known)

    def applied(self, started: ApplyStarted, batch: AppliedBatch) -> None:
        """After an apply of `started`'s users: drop the tasks it finished and, if it read them
        all, those stored before it was sent (finished, or finished elsewhere); remember what it
        left where nothing else can have changed it."""
        for recipient in batch.recipients:
            self.changed_elsewhere(recipient)
        self._applying.difference_update(started.known)
        for user_id, known_then in started.known.items():
            news = self._news_of.pop(user_id, 0)
            tasks = self._pending.get(user_id)
            outcomes = batch.outcomes.get(user_id, [])
            read_all = not batch.remembered and user_id not in batch.deferred and len(outcomes) < self._batch_size
            if tasks is not None:
                for outcome in outcomes:
                    tasks.pop(outcome.task_id, None)
                if read_all:
                    for task_id in known_then:
                        tasks.pop(task_id, None)
            account = batch.accounts.get(user_id)
            remembered = batch.remembered or read_all
            self._accounts.pop(user_id, None)  # re-inserted last: the most recently applied
            if account is not None and remembered and news <= started.news:
                self._accounts[user_id] = account
                if len(self._accounts) > _AT_MOST:
                    del self._accounts[next(iter(self._accounts))]
