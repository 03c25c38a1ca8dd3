"""`message-broker verify`: prove the stored balances from the history.

For every user (or one, with --user): its opening balance and held plus what its done tasks did
must be its stored balance and held, and held must be the sum of its active holds; no task may
have recorded a negative available balance; every done transfer has exactly one transfer-in of
its amount to its recipient (and every transfer-in a done transfer); every hold is resolved at
most once, and its row (amount, status, resolved_by, captured_amount, expires_at) agrees with its
tasks, a done capture or void stored before its deadline; no task was applied before its user was created; each
finished task's recorded balance_after and available_after must follow from the task before it
in applied order, (processed_at, id), the statements' order (the first from the opening balance
and held; the rules of ledger.py: a cancelled task records the same values again), so that every
statement adds up; the first task that breaks a user's chain is named (the later ones follow from
it); and money is conserved: the sum of balances is the sum of openings plus replenishments minus
write-offs and captures.

PostgreSQL does the sums and the comparisons (one pass over the tasks per check, in one
snapshot) and sends back only what fails, through a cursor; this prints one line per problem,
then a summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .db.audit import snapshot
from .db.driver import Row
from .db.options import ConnectionOptions


@dataclass
class Report:
    users: int = 0
    tasks: int = 0
    problems: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        verdict = "no problems" if not self.problems else f"{self.problems} problem{'s' * (self.problems != 1)}"
        return (
            f"verify: {self.users} user{'s' * (self.users != 1)}, {self.tasks} finished "
            f"task{'s' * (self.tasks != 1)} checked in {self.seconds:.2f} s "
            f"({self.rate:,.0f} tasks/s): {verdict}"
        )


Print = Callable[[str], None]


async def verify(options: ConnectionOptions, user_id: int | None = None, out: Print = print) -> Report:
    """Run every check; print each problem as `user <id>: <what>: expected <x>, found <y>`."""
    report = Report()
    started = time.perf_counter()

    def problem(user: object, what: str, expected: object, found: object) -> None:
        report.problems += 1
        out(f"user {user}: {what}: expected {expected}, found {found}")

    async with snapshot(options, user_id) as db:
        totals: Row | None = None
        async for row in db.rows("audit_users"):  # the users that fail a check, and the totals
            if row["totals"]:
                totals = row
            else:
                _check_user(row, problem)
        assert totals is not None, "audit_users ends with its totals row"
        report.users, report.tasks = int(totals["users"]), int(totals["tasks"] or 0)
        async for row in db.rows("audit_transfers"):
            _check_transfer(row, problem)
        async for row in db.rows("audit_hold_resolutions"):
            ids = ", ".join(map(str, row["task_ids"]))
            problem(row["user_id"], f"hold {row['hold_id']} resolved by tasks {ids}", "at most 1", row["resolutions"])
        async for row in db.rows("audit_holds"):  # each hold's row against its tasks
            problem(row["user_id"], f"hold {row['hold_id']} {row['field']}", row["expected"], row["found"])
        async for row in db.rows("audit_history"):  # the first break of each user's chain, per column
            what = f"task {row['task_id']} {row['field']} (opening + finished tasks up to it, in applied order)"
            problem(row["user_id"], what, int(row["expected"]), row["found"])
        if user_id is None:
            # Transfers move money between users; only the whole system must balance.
            balances = int(totals["balance"] or 0)
            expected = int(totals["openings"] or 0) + int(totals["replenished"] or 0) - int(totals["removed"] or 0)
            if balances != expected:
                what = "money conserved (sum of balances = openings + replenishments - write-offs - captures)"
                problem("*", what, expected, balances)
    if user_id is not None and report.users == 0:
        problem(user_id, "exists", "a user", "none")
    report.seconds = time.perf_counter() - started
    out(report.summary())
    return report


def _check_user(row: Row, problem: Callable[[object, str, object, object], None]) -> None:
    user = row["user_id"]
    if row["expected_balance"] != row["balance"]:
        problem(user, "balance (opening + done tasks)", row["expected_balance"], row["balance"])
    if row["expected_held"] != row["held"]:
        problem(user, "held (opening + done holds - resolved holds)", row["expected_held"], row["held"])
    if row["active_holds"] != row["held"]:
        problem(user, "held (sum of active holds)", row["active_holds"], row["held"])
    if row["first_processed"] is not None and row["first_processed"] < row["created_at"]:
        # Applied before the user existed: in no statement, and balance?at of then is 404.
        what = "first finished task's processed_at (at or after the user's created_at)"
        problem(user, what, f">= {row['created_at'].isoformat()}", row["first_processed"].isoformat())
    if row["negative_available"]:
        what = f"tasks with a negative available_after (the first: task {row['first_negative']})"
        problem(user, what, 0, row["negative_available"])


def _check_transfer(row: Row, problem: Callable[[object, str, object, object], None]) -> None:
    user, task_id = row["user_id"], row["task_id"]
    if row["kind"] == "transfer-in":
        problem(user, f"transfer-in {task_id} of transfer", "a done transfer", "none")
    elif row["entries"] != 1:
        problem(user, f"transfer {task_id} transfer-in entries", 1, row["entries"])
    elif row["entry_amount"] != row["amount"]:
        problem(user, f"transfer {task_id} transfer-in amount", row["amount"], row["entry_amount"])
    else:
        problem(user, f"transfer {task_id} recipient", row["counterparty_id"], row["entry_user"])
