"""The ledger's rules restated independently of message_broker.ledger, as a sequential model that
the property tests compare the service with: one task at a time, its effects at once.

- replenishment: never past 2^63-1 (balance_overflow);
- write-off, transfer, hold: never more than available = balance - held (insufficient_funds);
- transfer: the recipient is credited at once, never past 2^63-1 (balance_overflow), and gets an
  entry of its own (transfer-in);
- capture, void, release: only of an active hold of the same user, and a capture or void only
  before its deadline (hold_not_active); a capture of more than the hold is refused
  (amount_exceeds_hold); a capture charges its amount and frees the whole hold, a void or release
  frees it;
- a refused task changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX = 2**63 - 1

# (status, reason, balance_after, available_after)
Outcome = tuple[str, str | None, int, int]


@dataclass(frozen=True)
class Step:
    """One task as the model sees it. `late`: a capture or void that arrives after the deadline."""

    user: int
    type: str
    amount: int
    to: int | None = None  # a transfer's recipient
    hold: int | None = None  # the step index of the hold a capture, void or release resolves
    late: bool = False


@dataclass
class Model:
    balance: dict[int, int]
    held: dict[int, int] = field(default_factory=dict)
    # step index of a done hold -> (user, amount, "active" | "captured" | "voided" | "expired")
    holds: dict[int, tuple[int, int, str]] = field(default_factory=dict)

    def available(self, user: int) -> int:
        return self.balance[user] - self.held.get(user, 0)

    def outcome(self, user: int, status: str, reason: str | None = None) -> Outcome:
        return status, reason, self.balance[user], self.available(user)

    def step(self, index: int, step: Step) -> tuple[Outcome, Outcome | None]:
        """Apply step number `index`: its outcome, and the recipient's entry for a done transfer."""
        user, kind, amount = step.user, step.type, step.amount
        if kind == "replenishment":
            if self.balance[user] + amount > MAX:
                return self.outcome(user, "cancelled", "balance_overflow"), None
            self.balance[user] += amount
        elif kind in ("write-off", "transfer", "hold"):
            if amount > self.available(user):
                return self.outcome(user, "cancelled", "insufficient_funds"), None
            if kind == "write-off":
                self.balance[user] -= amount
            elif kind == "hold":
                self.held[user] = self.held.get(user, 0) + amount
                self.holds[index] = (user, amount, "active")
            else:
                assert step.to is not None
                if self.balance[step.to] + amount > MAX:
                    return self.outcome(user, "cancelled", "balance_overflow"), None
                self.balance[user] -= amount
                self.balance[step.to] += amount
                return self.outcome(user, "done"), self.outcome(step.to, "done")
        elif kind in ("capture", "void", "release"):
            assert step.hold is not None
            hold = self.holds.get(step.hold)
            if hold is None or hold[0] != user or hold[2] != "active" or (step.late and kind != "release"):
                return self.outcome(user, "cancelled", "hold_not_active"), None
            _, hold_amount, _ = hold
            if kind == "capture" and amount > hold_amount:
                return self.outcome(user, "cancelled", "amount_exceeds_hold"), None
            self.held[user] -= hold_amount
            if kind == "capture":
                self.balance[user] -= amount
            self.holds[step.hold] = (user, hold_amount, {"capture": "captured", "void": "voided"}.get(kind, "expired"))
        else:
            raise AssertionError(f"unknown kind {kind}")
        return self.outcome(user, "done"), None


def model_run(balances: dict[int, int], steps: list[Step]) -> tuple[Model, list[tuple[Outcome, Outcome | None]]]:
    """Steps applied one after another: the model's final state and each step's outcome."""
    model = Model(dict(balances))
    return model, [model.step(index, step) for index, step in enumerate(steps)]


def edge_amounts(model: Model, user: int, to: int | None = None, hold_amount: int | None = None) -> list[int]:
    """Amounts at the edges of what `user` has in `model` at this step, and one more of each: its
    balance, its available, the room below 2^63-1 (and the recipient's, for a transfer to `to`), the
    amount of the hold a step resolves; [1] if none of them is a valid amount."""
    edges = [model.balance[user], model.available(user), MAX - model.balance[user]]
    if to is not None:
        edges.append(MAX - model.balance[to])
    if hold_amount is not None:
        edges.append(hold_amount)
    edges += [e + 1 for e in edges]
    return [e for e in edges if 1 <= e <= MAX] or [1]
