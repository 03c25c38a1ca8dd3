"""The ledger's rules against the independent sequential model (tests/model.py), over random
histories of every kind of task across a few users, with amounts drawn at the edges of what each
user has; and batched the way the workers batch them, checked by tests/ledger_check.py."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from message_broker.ledger import BIGINT_MAX, Account, Hold, HoldStatus, PendingTask, TaskType, apply_batches

from ..ledger_check import FinishedTask, check_user_ledger
from ..model import Model, Step, edge_amounts, model_run

T0 = datetime(2026, 11, 29, tzinfo=UTC)
DEADLINE = T0 + timedelta(hours=1)
KINDS = ["replenishment", "write-off", "transfer", "hold", "capture", "void", "release"]


@st.composite
def histories(draw: st.DrawFn) -> tuple[dict[int, int], list[Step]]:
    """Starting balances and steps whose amounts hit the edges of what the user has at its turn
    (its balance, its available, the room below 2^63-1, a hold's amount, and one more)."""
    balances = {
        user: draw(st.one_of(st.integers(0, 100), st.integers(BIGINT_MAX - 100, BIGINT_MAX)))
        for user in range(1, draw(st.integers(1, 4)) + 1)
    }
    model = Model(dict(balances))
    steps: list[Step] = []
    for index in range(draw(st.integers(0, 30))):
        user = draw(st.sampled_from(sorted(balances)))
        kind = draw(st.sampled_from(KINDS))
        own_holds = [i for i, step in enumerate(steps) if step.type == "hold" and step.user == user]
        hold = draw(st.sampled_from(own_holds)) if own_holds and kind in ("capture", "void", "release") else None
        others = [u for u in balances if u != user]
        if (kind in ("capture", "void", "release") and hold is None) or (kind == "transfer" and not others):
            kind = "replenishment"
        to = draw(st.sampled_from(others)) if kind == "transfer" else None
        edges = edge_amounts(model, user, to, None if hold is None else steps[hold].amount)
        amount = draw(st.one_of(st.sampled_from(edges), st.integers(1, 50)))
        if hold is not None and kind != "capture":
            amount = steps[hold].amount
        late = kind in ("capture", "void") and draw(st.integers(0, 5)) == 0
        step = Step(user, kind, amount, to=to, hold=hold, late=late)
        model.step(index, step)
        steps.append(step)
    return balances, steps


def _pending(index: int, step: Step) -> PendingTask:
    """Step number `index` as the task with id index + 1."""
    return PendingTask(
        index + 1,
        TaskType(step.type),
        step.amount,
        counterparty_id=step.to,
        hold_id=None if step.hold is None else step.hold + 1,
        created_at=DEADLINE + timedelta(seconds=1) if step.late else T0,
        expires_at=DEADLINE if step.type == "hold" else None,
    )


@dataclass
class Ledger:
    """What the database would hold, for a simulation of the workers."""

    accounts: dict[int, Account]
    holds: dict[int, Hold] = field(default_factory=dict)
    entries: dict[int, list[FinishedTask]] = field(default_factory=dict)
    next_id: int = 10_000  # transfer-in ids, above every task's

    def apply(self, pending: dict[int, list[PendingTask]], position: int, locked: set[int] | None = None) -> set[int]:
        """One apply transaction over `pending` (accounts outside `locked` are not locked);
        returns the ids of the tasks it finished."""
        accounts = {u: a for u, a in self.accounts.items() if locked is None or u in locked}
        result = apply_batches(accounts, pending, self.holds)
        self.accounts.update(result.accounts)
        self.holds.update(result.holds)
        finished = set()
        for user, outcomes in result.outcomes.items():
            kinds = {t.id: t for t in pending[user]}
            for o in outcomes:
                t = kinds[o.task_id]
                self.entries.setdefault(user, []).append(
                    FinishedTask(
                        o.task_id,
                        t.type.value,
                        t.amount,
                        o.status.value,
                        o.reason.value if o.reason else None,
                        o.balance_after,
                        o.available_after,
                        t.counterparty_id,
                        None,
                        t.hold_id,
                        position,
                    )
                )
                finished.add(o.task_id)
        for entry in result.transfers_in:
            self.next_id += 1
            self.entries.setdefault(entry.user_id, []).append(
                FinishedTask(
                    self.next_id,
                    "transfer-in",
                    entry.amount,
                    "done",
                    None,
                    entry.balance_after,
                    entry.available_after,
                    entry.sender_id,
                    entry.transfer_id,
                    None,
                    position,
                )
            )
        return finished


@settings(deadline=None, max_examples=300)
@given(histories())
def test_one_task_at_a_time_matches_the_sequential_model(history: tuple[dict[int, int], list[Step]]) -> None:
    balances, steps = history
    model, expected = model_run(balances, steps)
    ledger = Ledger({user: Account(balance) for user, balance in balances.items()})
    for index, step in enumerate(steps):
        task = _pending(index, step)
        ledger.apply({step.user: [task]}, position=index)
        mine = ledger.entries[step.user]
        entry = next(e for e in mine if e.id == task.id)
        outcome, credited = expected[index]
        assert (entry.status, entry.reason, entry.balance_after, entry.available_after) == outcome, (index, step)
        if credited is not None:
            assert step.to is not None
            credit = ledger.entries[step.to][-1]
            assert (credit.type, credit.transfer_id, credit.amount) == ("transfer-in", task.id, step.amount)
            assert (credit.status, credit.reason, credit.balance_after, credit.available_after) == credited
    assert {u: (a.balance, a.held) for u, a in ledger.accounts.items()} == {
        u: (model.balance[u], model.held.get(u, 0)) for u in balances
    }


@settings(deadline=None, max_examples=300)
@given(histories(), st.integers(0, 2**32))
def test_batched_like_the_workers_every_history_explains_its_balances(
    history: tuple[dict[int, int], list[Step]], seed: int
) -> None:
    """Batches of several users, each taking some of its oldest pending tasks; some accounts not
    lockable now and then (their senders' batches stop short and go again later). Whatever the
    cuts, every user's entries in (batch, id) order chain from its starting balance to its final
    one, money is conserved and each hold resolves once."""
    balances, steps = history
    rng = random.Random(seed)
    queues = {user: [_pending(i, s) for i, s in enumerate(steps) if s.user == user] for user in balances}
    ledger = Ledger({user: Account(balance) for user, balance in balances.items()})
    position = 0
    while any(queues.values()):
        position += 1
        users = [u for u in queues if queues[u] and rng.random() < 0.7] or [next(u for u in queues if queues[u])]
        pending = {u: queues[u][: rng.randint(1, 5)] for u in sorted(users)}
        locked = {u for u in balances if rng.random() < 0.8} | set(users)
        finished = ledger.apply(pending, position, locked)
        for user in users:
            queues[user] = [t for t in queues[user] if t.id not in finished]
    holds = {i + 1: s.amount for i, s in enumerate(steps) if s.type == "hold"}
    for user, balance in balances.items():
        account = ledger.accounts[user]
        check_user_ledger(
            balance, account.balance, ledger.entries.get(user, []), final_held=account.held, hold_amounts=holds
        )
        active = sum(h.amount for h in ledger.holds.values() if h.user_id == user and h.status is HoldStatus.ACTIVE)
        assert account.held == active
    done = [e for entries in ledger.entries.values() for e in entries if e.status == "done"]
    inflow = sum(e.amount for e in done if e.type == "replenishment")
    outflow = sum(e.amount for e in done if e.type in ("write-off", "capture"))
    assert sum(a.balance for a in ledger.accounts.values()) == sum(balances.values()) + inflow - outflow
    transfers = {e.id for e in done if e.type == "transfer"}
    assert sorted(e.transfer_id for e in done if e.type == "transfer-in") == sorted(transfers)
