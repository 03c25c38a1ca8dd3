"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that records every request
(headers and the exact body bytes) and answers as the test says (a status, headers, a delay, or
not at all while it is "down"). Every signature it got can be checked with the Standard Webhooks
reference library (`standardwebhooks`)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from .pg import free_port


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class Receiver:
    def __init__(self, path: str = "/hook") -> None:
        self.path = path
        self.port = free_port()
        self.received: list[Received] = []
        self.started = 0  # requests that arrived, answered or not yet
        self.answer = Answer()
        # Answers for the next requests, before `answer` applies again.
        self.next_answers: list[Answer] = []
        self._runner: web.AppRunner | None = None
        self.arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        """Down: connections are refused until start() again (on the same port)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.started += 1
        body = await request.read()
        answer = self.next_answers.pop(0) if self.next_answers else self.answer
        if answer.delay:
            await asyncio.sleep(answer.delay)
        self.received.append(Received(dict(request.headers), body, answer.status))
        self.arrived.set()
        return web.Response(status=answer.status, headers=answer.headers)

    # -- what arrived --------------------------------------------------------------------------------

    def accepted(self) -> list[Received]:
        """Requests answered 2xx."""
        return [r for r in self.received if 200 <= r.status < 300]

    def ids(self) -> Counter[str]:
        return Counter(r.webhook_id for r in self.accepted())

    def task_ids(self) -> set[str]:
        return {r.event["data"]["id"] for r in self.accepted()}

    def verify_all(self, *secrets: str) -> list[Any]:
        """Every request's signature checked by the reference library with one of `secrets`
        (the endpoint's; several around a rotation); the events. Raises if one does not verify."""
        events = []
        for request in self.received:
            errors = []
            for secret in secrets:
                try:
                    events.append(Webhook(secret).verify(request.body, request.headers))
                    break
                except Exception as exc:
                    errors.append(exc)
            else:
                raise AssertionError(f"signature of {request.webhook_id} does not verify: {errors}")
        return events
