"""The ledger's rules, case by case (tests/unit/test_ledger_properties.py holds them against the
independent model over random histories)."""

from datetime import UTC, datetime, timedelta

from message_broker.ledger import (
    BIGINT_MAX,
    Account,
    Hold,
    HoldStatus,
    PendingTask,
    Reason,
    Status,
    TaskType,
    TransferIn,
    apply_batches,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
DEADLINE = NOW + timedelta(hours=1)
DONE, CANCELLED = Status.DONE, Status.CANCELLED


def task(task_id: int, kind: TaskType, amount: int, **extra: object) -> PendingTask:
    return PendingTask(task_id, kind, amount, created_at=extra.pop("created_at", NOW), **extra)  # type: ignore[arg-type]


def outcomes(result, user: int) -> list[tuple[int, Status, Reason | None, int, int]]:  # type: ignore[no-untyped-def]
    return [tuple(o) for o in result.outcomes[user]]


def test_replenishment_and_write_off() -> None:
    result = apply_batches(
        {1: Account(10)},
        {1: [task(1, TaskType.WRITE_OFF, 15), task(2, TaskType.REPLENISHMENT, 10), task(3, TaskType.WRITE_OFF, 15)]},
        {},
    )
    assert outcomes(result, 1) == [
        (1, CANCELLED, Reason.INSUFFICIENT_FUNDS, 10, 10),
        (2, DONE, None, 20, 20),
        (3, DONE, None, 5, 5),
    ]
    assert result.accounts == {1: Account(5)}


def test_replenishment_past_bigint_is_cancelled() -> None:
    result = apply_batches(
        {1: Account(BIGINT_MAX - 1)}, {1: [task(1, TaskType.REPLENISHMENT, 1), task(2, TaskType.REPLENISHMENT, 1)]}, {}
    )
    assert outcomes(result, 1) == [
        (1, DONE, None, BIGINT_MAX, BIGINT_MAX),
        (2, CANCELLED, Reason.BALANCE_OVERFLOW, BIGINT_MAX, BIGINT_MAX),
    ]


def test_write_offs_are_checked_against_available_not_balance() -> None:
    result = apply_batches(
        {1: Account(100, held=60)}, {1: [task(1, TaskType.WRITE_OFF, 41), task(2, TaskType.WRITE_OFF, 40)]}, {}
    )
    assert outcomes(result, 1) == [(1, CANCELLED, Reason.INSUFFICIENT_FUNDS, 100, 40), (2, DONE, None, 60, 0)]


def test_a_transfer_moves_money_and_writes_the_recipients_entry() -> None:
    result = apply_batches(
        {1: Account(50), 2: Account(5)}, {1: [task(7, TaskType.TRANSFER, 20, counterparty_id=2)]}, {}
    )
    assert outcomes(result, 1) == [(7, DONE, None, 30, 30)]
    assert result.transfers_in == [TransferIn(2, 20, 1, 7, 25, 25)]
    assert result.accounts == {1: Account(30), 2: Account(25)}


def test_a_transfer_beyond_available_moves_nothing() -> None:
    result = apply_batches(
        {1: Account(50, held=40), 2: Account(5)}, {1: [task(7, TaskType.TRANSFER, 20, counterparty_id=2)]}, {}
    )
    assert outcomes(result, 1) == [(7, CANCELLED, Reason.INSUFFICIENT_FUNDS, 50, 10)]
    assert result.transfers_in == [] and 2 not in result.accounts


def test_a_transfer_that_would_overflow_the_recipient_is_cancelled_and_the_batch_worked_out_again() -> None:
    """The recipient's own replenishment in the same batch comes first (its own tasks precede the
    credits), so the credit would pass 2^63-1: the transfer is cancelled, and the sender's later
    write-off, which counted on the money being gone, sees it still there."""
    result = apply_batches(
        {1: Account(100), 2: Account(BIGINT_MAX - 100)},
        {
            1: [task(1, TaskType.TRANSFER, 60, counterparty_id=2), task(2, TaskType.WRITE_OFF, 70)],
            2: [task(3, TaskType.REPLENISHMENT, 50)],
        },
        {},
    )
    assert outcomes(result, 1) == [(1, CANCELLED, Reason.BALANCE_OVERFLOW, 100, 100), (2, DONE, None, 30, 30)]
    assert outcomes(result, 2) == [(3, DONE, None, BIGINT_MAX - 50, BIGINT_MAX - 50)]
    assert result.transfers_in == []


def test_transfers_both_ways_in_one_batch() -> None:
    result = apply_batches(
        {1: Account(10), 2: Account(0)},
        {1: [task(1, TaskType.TRANSFER, 10, counterparty_id=2)], 2: [task(2, TaskType.TRANSFER, 5, counterparty_id=1)]},
        {},
    )
    # Each user's own tasks first: 2 has nothing yet, so its transfer is refused; then the credit.
    assert outcomes(result, 1) == [(1, DONE, None, 0, 0)]
    assert outcomes(result, 2) == [(2, CANCELLED, Reason.INSUFFICIENT_FUNDS, 0, 0)]
    assert result.transfers_in == [TransferIn(2, 10, 1, 1, 10, 10)]


def test_a_transfer_to_an_account_not_locked_stops_its_senders_batch() -> None:
    result = apply_batches(
        {1: Account(50)},
        {
            1: [
                task(1, TaskType.WRITE_OFF, 5),
                task(2, TaskType.TRANSFER, 5, counterparty_id=9),
                task(3, TaskType.WRITE_OFF, 5),
            ]
        },
        {},
    )
    assert outcomes(result, 1) == [(1, DONE, None, 45, 45)]
    assert result.deferred == {1}


def test_hold_capture_void_and_release() -> None:
    result = apply_batches(
        {1: Account(100)},
        {
            1: [
                task(1, TaskType.HOLD, 30, expires_at=DEADLINE),
                task(2, TaskType.HOLD, 80, expires_at=DEADLINE),  # only 70 available
                task(3, TaskType.WRITE_OFF, 71),  # nor this
                task(4, TaskType.CAPTURE, 20, hold_id=1),  # charges 20, frees all 30
                task(5, TaskType.VOID, 30, hold_id=1),  # too late: captured
                task(6, TaskType.HOLD, 50, expires_at=DEADLINE),
                task(7, TaskType.VOID, 50, hold_id=6),
                task(8, TaskType.HOLD, 10, expires_at=DEADLINE),
                task(9, TaskType.RELEASE, 10, hold_id=8),
            ]
        },
        {},
    )
    assert outcomes(result, 1) == [
        (1, DONE, None, 100, 70),
        (2, CANCELLED, Reason.INSUFFICIENT_FUNDS, 100, 70),
        (3, CANCELLED, Reason.INSUFFICIENT_FUNDS, 100, 70),
        (4, DONE, None, 80, 80),
        (5, CANCELLED, Reason.HOLD_NOT_ACTIVE, 80, 80),
        (6, DONE, None, 80, 30),
        (7, DONE, None, 80, 80),
        (8, DONE, None, 80, 70),
        (9, DONE, None, 80, 80),
    ]
    assert {h.id: (h.status, h.captured_amount, h.resolved_by) for h in result.holds.values()} == {
        1: (HoldStatus.CAPTURED, 20, 4),
        6: (HoldStatus.VOIDED, None, 7),
        8: (HoldStatus.EXPIRED, None, 9),
    }
    assert result.accounts == {1: Account(80, 0)}


def test_resolving_a_hold_applied_earlier() -> None:
    hold = Hold(5, 1, 30, DEADLINE)
    result = apply_batches(
        {1: Account(100, held=30)},
        {1: [task(6, TaskType.CAPTURE, 31, hold_id=5), task(7, TaskType.CAPTURE, 30, hold_id=5)]},
        {5: hold},
    )
    assert outcomes(result, 1) == [(6, CANCELLED, Reason.AMOUNT_EXCEEDS_HOLD, 100, 70), (7, DONE, None, 70, 70)]
    assert result.holds == {5: hold._replace(status=HoldStatus.CAPTURED, captured_amount=30, resolved_by=7)}


def test_a_capture_or_void_that_arrives_at_the_deadline_is_too_late_but_a_release_is_not() -> None:
    hold = Hold(5, 1, 30, DEADLINE)
    result = apply_batches(
        {1: Account(100, held=30)},
        {
            1: [
                task(6, TaskType.CAPTURE, 30, hold_id=5, created_at=DEADLINE),
                task(7, TaskType.VOID, 30, hold_id=5, created_at=DEADLINE + timedelta(seconds=1)),
                task(8, TaskType.RELEASE, 30, hold_id=5, created_at=DEADLINE),
            ]
        },
        {5: hold},
    )
    assert [o.reason for o in result.outcomes[1]] == [Reason.HOLD_NOT_ACTIVE, Reason.HOLD_NOT_ACTIVE, None]
    assert result.holds[5].status is HoldStatus.EXPIRED and result.accounts[1] == Account(100, 0)


def test_a_hold_resolves_only_for_its_own_user_and_only_while_active() -> None:
    other = Hold(5, 2, 30, DEADLINE)
    gone = Hold(6, 1, 30, DEADLINE, HoldStatus.VOIDED, resolved_by=9)
    result = apply_batches(
        {1: Account(100)},
        {
            1: [
                task(7, TaskType.CAPTURE, 1, hold_id=5),
                task(8, TaskType.VOID, 30, hold_id=6),
                task(10, TaskType.VOID, 1, hold_id=99),
            ]
        },
        {5: other, 6: gone},
    )
    assert [o.reason for o in result.outcomes[1]] == [Reason.HOLD_NOT_ACTIVE] * 3
    assert result.holds == {}
