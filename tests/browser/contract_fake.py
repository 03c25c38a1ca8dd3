"""A stand-in for the API contract the core team is adding (holds, transfers, username search,
newest-first history, held/available), for testing the console's side of it before the real
backend lands. In memory, one process, no database: it serves the console's real pages (the
package's routes) and answers as the contract says, events included. NOT the backend: only what
the console's tests need, with the contract's shapes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from message_broker.http.console import add_console_routes

from ..servers import free_port

NULLS = {"available_after": None, "counterparty_id": None, "transfer_id": None, "hold_id": None, "expires_at": None}


class Ledger:
    def __init__(self) -> None:
        self.users: dict[int, dict[str, Any]] = {}
        self.tasks: list[dict[str, Any]] = []
        self.holds: dict[int, dict[str, Any]] = {}
        self.task_ids = itertools.count(1)
        self.hold_ids = itertools.count(1)
        self.transfer_ids = itertools.count(1)
        self.streams: list[tuple[int | None, asyncio.Queue[dict[str, Any] | None]]] = []
        self.missing: set[str] = set()  # endpoints to answer 404 not_found although documented

    def user_json(self, user_id: int) -> dict[str, Any]:
        user = self.users[user_id]
        return {**user, "id": str(user_id), "available": user["balance"] - user["held"]}

    def finish(self, user_id: int, task_type: str, amount: int, ok: bool, reason: str | None, **extra: Any) -> dict:  # type: ignore[type-arg]
        user = self.users[user_id]
        now = datetime.now(UTC).isoformat()
        task = {
            "id": str(next(self.task_ids)),
            "user_id": str(user_id),
            "type": task_type,
            "amount": amount,
            "status": "done" if ok else "cancelled",
            "reason": None if ok else reason,
            "balance_after": user["balance"],
            "created_at": now,
            "processed_at": now,
            **NULLS,
            "available_after": user["balance"] - user["held"],
            **extra,
        }
        self.tasks.append(task)
        for wanted, queue in self.streams:
            if wanted in (None, user_id):
                queue.put_nowait(task)
        return task


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": {}}}
    return web.json_response(body, status=status)


def build_app(ledger: Ledger) -> web.Application:
    app = web.Application()
    routes = web.RouteTableDef()

    def user_of(request: web.Request, name: str = "user_id") -> int | web.Response:
        user_id = int(request.match_info[name])
        if user_id not in ledger.users:
            return _error(404, "user_not_found", f"user {user_id} does not exist")
        return user_id

    @routes.get("/api/v1/openapi.json")
    async def spec(request: web.Request) -> web.Response:
        def params(*names: str) -> list[dict[str, str]]:
            return [{"in": "query", "name": n} for n in names]

        return web.json_response(
            {
                "paths": {
                    "/api/v1/user/": {
                        "get": {"parameters": params("limit", "after", "username_prefix", "after_username")},
                        "post": {},
                    },
                    "/api/v1/user/{user_id}": {"get": {}},
                    "/api/v1/user/{user_id}/amount/": {"post": {}},
                    "/api/v1/user/{user_id}/tasks": {
                        "get": {"parameters": params("limit", "after", "order", "before")}
                    },
                    "/api/v1/user/{user_id}/transfer/": {"post": {}},
                    "/api/v1/user/{user_id}/holds/": {"post": {}, "get": {}},
                    "/api/v1/hold/{hold_id}": {"get": {}},
                    "/api/v1/hold/{hold_id}/capture/": {"post": {}},
                    "/api/v1/hold/{hold_id}/void/": {"post": {}},
                }
            }
        )

    @routes.get("/api/v1/user/")
    async def users(request: web.Request) -> web.Response:
        prefix = request.query.get("username_prefix", "")
        after = request.query.get("after_username", "")
        limit = int(request.query.get("limit", "100"))
        found = sorted(
            (ledger.user_json(i) for i, u in ledger.users.items() if u["username"].startswith(prefix)),
            key=lambda u: u["username"],
        )
        return web.json_response([u for u in found if u["username"] > after][:limit])

    @routes.get("/api/v1/user/{user_id}")
    async def user(request: web.Request) -> web.Response:
        user_id = user_of(request)
        return user_id if isinstance(user_id, web.Response) else web.json_response(ledger.user_json(user_id))

    @routes.get("/api/v1/user/{user_id}/tasks")
    async def tasks(request: web.Request) -> web.Response:
        user_id = user_of(request)
        if isinstance(user_id, web.Response):
            return user_id
        assert request.query.get("order") == "desc", "the console asks for newest first when the server offers it"
        before = int(request.query.get("before", str(2**63)))
        mine = [t for t in reversed(ledger.tasks) if t["user_id"] == str(user_id) and int(t["id"]) < before]
        return web.json_response(mine[: int(request.query.get("limit", "100"))])

    @routes.post("/api/v1/user/{user_id}/amount/")
    async def amount(request: web.Request) -> web.Response:
        user_id = user_of(request)
        if isinstance(user_id, web.Response):
            return user_id
        body = await request.json()
        user = ledger.users[user_id]
        ok = body["type"] == "replenishment" or body["amount"] <= user["balance"] - user["held"]
        if ok:
            user["balance"] += body["amount"] if body["type"] == "replenishment" else -body["amount"]
        return web.json_response(ledger.finish(user_id, body["type"], body["amount"], ok, "insufficient_funds"))

    @routes.post("/api/v1/user/{user_id}/transfer/")
    async def transfer(request: web.Request) -> web.Response:
        if "transfer" in ledger.missing:
            return _error(404, "not_found", "Not Found")
        user_id = user_of(request)
        if isinstance(user_id, web.Response):
            return user_id
        assert "Idempotency-Key" in request.headers and request.query.get("wait") == "5"
        body = await request.json()
        assert isinstance(body["to"], str) and body["to"].isdigit(), body
        to = int(body["to"])
        sender = ledger.users[user_id]
        ok = body["amount"] <= sender["balance"] - sender["held"]
        transfer_id = str(next(ledger.transfer_ids))
        if ok:
            sender["balance"] -= body["amount"]
            ledger.users[to]["balance"] += body["amount"]
            ledger.finish(to, "transfer-in", body["amount"], True, None, counterparty_id=str(user_id))
        task = ledger.finish(
            user_id,
            "transfer",
            body["amount"],
            ok,
            "insufficient_funds",
            counterparty_id=body["to"],
            transfer_id=transfer_id,
        )
        return web.json_response(task)

    @routes.post("/api/v1/user/{user_id}/holds/")
    async def place_hold(request: web.Request) -> web.Response:
        user_id = user_of(request)
        if isinstance(user_id, web.Response):
            return user_id
        body = await request.json()
        user = ledger.users[user_id]
        ok = body["amount"] <= user["balance"] - user["held"]
        hold_id = next(ledger.hold_ids)
        expires = (datetime.now(UTC) + timedelta(seconds=body.get("expires_in", 3600))).isoformat()
        if ok:
            user["held"] += body["amount"]
        ledger.holds[hold_id] = {
            "id": str(hold_id),
            "user_id": str(user_id),
            "amount": body["amount"],
            "status": "active" if ok else "cancelled",
            "captured_amount": None,
            "expires_at": expires,
            "resolved_by": None,
        }
        task = ledger.finish(
            user_id, "hold", body["amount"], ok, "insufficient_funds", hold_id=str(hold_id), expires_at=expires
        )
        return web.json_response(task)

    @routes.get("/api/v1/user/{user_id}/holds")
    async def holds(request: web.Request) -> web.Response:
        user_id = user_of(request)
        if isinstance(user_id, web.Response):
            return user_id
        status = request.query.get("status")
        found = [h for h in ledger.holds.values() if h["user_id"] == str(user_id) and status in (None, h["status"])]
        return web.json_response(found)

    async def resolve(request: web.Request, verb: str) -> web.Response:
        hold = ledger.holds.get(int(request.match_info["hold_id"]))
        if hold is None:
            return _error(404, "hold_not_found", "no such hold")
        body = await request.json()
        user_id = int(hold["user_id"])
        user = ledger.users[user_id]
        amount = body.get("amount", hold["amount"])
        active = hold["status"] == "active"
        ok = active and amount <= hold["amount"]
        reason = "hold_not_active" if not active else "amount_exceeds_hold"
        if ok:
            user["held"] -= hold["amount"]
            if verb == "capture":
                user["balance"] -= amount
                hold["captured_amount"] = amount
            hold["status"] = "captured" if verb == "capture" else "voided"
        task = ledger.finish(user_id, verb, amount, ok, reason, hold_id=hold["id"])
        return web.json_response(task)

    @routes.post("/api/v1/hold/{hold_id}/capture/")
    async def capture(request: web.Request) -> web.Response:
        return await resolve(request, "capture")

    @routes.post("/api/v1/hold/{hold_id}/void/")
    async def void(request: web.Request) -> web.Response:
        return await resolve(request, "void")

    async def stream(request: web.Request, user_id: int | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        entry = (user_id, queue)
        ledger.streams.append(entry)
        try:
            await response.write(b": live\n\n")
            while (task := await queue.get()) is not None:  # None: the fake stops
                await response.write(f"id: {task['id']}\ndata: {json.dumps(task)}\n\n".encode())
        finally:
            ledger.streams.remove(entry)

    @routes.get("/api/v1/user/{user_id}/events")
    async def user_events(request: web.Request) -> web.StreamResponse:
        user_id = user_of(request)
        return user_id if isinstance(user_id, web.Response) else await stream(request, user_id)

    @routes.get("/api/v1/events")
    async def all_events(request: web.Request) -> web.StreamResponse:
        return await stream(request, None)

    @routes.get("/ready")
    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "checks": {"listener": True, "database": True}})

    @routes.get("/api/v1/stats")
    async def stats(request: web.Request) -> web.Response:
        zeros = [0] * 300
        return web.json_response(
            {
                "time": datetime.now(UTC).isoformat(),
                "window_seconds": 300,
                "series": {"accepted": zeros, "applied": zeros, "cancelled": zeros},
                "pending": 0,
                "latency_ms": {"p50": None, "p99": None},
                "active_user_loops": 0,
                "database": True,
                "listener": True,
            }
        )

    app.add_routes(routes)
    add_console_routes(app)
    return app


class FakeServer:
    """The fake in a thread of its own, on a free port of 127.0.0.1."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="contract-fake", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(build_app(self.ledger), shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def call(self, fn: Any) -> Any:
        """Run `fn` in the fake's event loop (where its streams live) and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _stop(self) -> None:
        for _, queue in list(self.ledger.streams):
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
