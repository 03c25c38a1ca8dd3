"""How the server counts SIGTERM and SIGINT (server.StopSignals), on a clock of the test's own:
the first stops, the second is noted and changes nothing, the third exits at once; signals less
than a second apart are one request (make forwards the SIGTERM its process group got)."""

from __future__ import annotations

import logging
import signal

import pytest

from message_broker.server import StopSignals


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _signals(clock: Clock, exits: list[bool]) -> StopSignals:
    return StopSignals(5.0, clock=clock, exit_now=lambda: exits.append(True))


def test_first_stops_second_is_noted_third_exits(caplog: pytest.LogCaptureFixture) -> None:
    clock, exits = Clock(), []
    signals = _signals(clock, exits)
    caplog.set_level(logging.INFO, logger="message_broker")
    signals.received(signal.SIGTERM)
    assert signals.requested.is_set() and signals.count == 1 and not exits
    clock.now += 2
    signals.received(signal.SIGINT)
    assert signals.count == 2 and not exits
    clock.now += 2
    signals.received(signal.SIGTERM)
    assert exits == [True]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("SIGTERM: stopping") and "SHUTDOWN_TIMEOUT=5 s" in lines[0]
    assert lines[1].startswith("SIGINT while stopping: the stop goes on")
    assert lines[2].startswith("SIGTERM for the third time: exiting at once")


def test_signals_at_once_are_one_request(caplog: pytest.LogCaptureFixture) -> None:
    """A process group's SIGTERM and make's copy of it: one request, however many times over."""
    clock, exits = Clock(), []
    signals = _signals(clock, exits)
    caplog.set_level(logging.INFO, logger="message_broker")
    signals.received(signal.SIGTERM)
    for _ in range(3):
        clock.now += 0.01
        signals.received(signal.SIGTERM)
    assert signals.count == 1 and not exits
    assert "the same request to stop" in caplog.records[-1].getMessage()
    # Measured from the last request that counted, not from the last copy.
    clock.now += 1.0
    signals.received(signal.SIGTERM)
    assert signals.count == 2
    clock.now += 0.5
    signals.received(signal.SIGTERM)
    assert signals.count == 2 and not exits
