"""Fixtures of the integration tests (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..webhook_receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on 127.0.0.1, answering 200 until the test says otherwise."""
    found = await Receiver().start()
    yield found
    await found.stop()
