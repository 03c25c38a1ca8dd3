"""A minimal server-sent events reader for tests: events (id, data) and comment lines, with a
deadline on every read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Event:
    id: str | None
    data: str

    @property
    def task(self) -> dict[str, Any]:
        return json.loads(self.data)  # type: ignore[no-any-return]


@dataclass
class EventReader:
    response: aiohttp.ClientResponse
    comments: list[str] = field(default_factory=list)

    async def next(self, timeout: float = 10.0) -> Event | str:
        """The next event, or the next comment (a str)."""
        event_id: str | None = None
        data: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    if not data:
                        return line[1:].strip()
                    continue
                if not line:
                    if data:
                        return Event(event_id, "\n".join(data))
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "id":
                    event_id = value
                elif name == "data":
                    data.append(value)

    async def next_event(self, timeout: float = 10.0) -> Event:
        """The next event, skipping comments."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.next(timeout)
                if isinstance(item, Event):
                    return item

    async def until_live(self, timeout: float = 10.0) -> list[Event]:
        """Events up to the `: live` comment (the replay), once the stream is live."""
        replayed = []
        async with asyncio.timeout(timeout):
            while True:
                item = await self.next(timeout)
                if isinstance(item, Event):
                    replayed.append(item)
                elif item == "live":
                    return replayed

    async def events(self, count: int, timeout: float = 10.0) -> list[Event]:
        return [await self.next_event(timeout) for _ in range(count)]


@asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession, url: str, last_event_id: str | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[EventReader]:
    headers = {"Accept": "text/event-stream", **(headers or {})}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield EventReader(response)
