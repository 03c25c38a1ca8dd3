"""Server-sent event streams of finished tasks: GET /api/v1/user/<id>/events and /api/v1/events.

One event per finished task: `id:` the task id, `data:` the task JSON. Each task has a place in
the stream, (its batch's position, its id), growing in commit order (migration 0003).
Resuming with Last-Event-ID replays from the database, then goes live, with no gap and no
duplicate:

    1. look up the place of the Last-Event-ID task;
    2. replay everything after it from the database (the bulk, without buffering live events);
    3. subscribe to live events (buffered from now on), then replay once more: whatever finished
       during step 2 (usually nothing);
    4. drain the buffer, skipping events at or before the last place sent.

Places grow in commit order and live events arrive in that order, so a live event at or before
the last replayed place was in the replay, and one after it was not. When the LISTEN connection
reconnects (notifications may have been lost), or a burst overflows the stream's buffer while it
is not busy writing, the stream replays from its place again. A stream without Last-Event-ID
starts after the latest committed batch (read before the answer starts, then replayed from once
subscribed, as a resume is). A client too slow for its buffer is disconnected (see
worker/event_hub.py). A stream ends when its request would no longer be let in (its token revoked
or expired, or the first token turning authentication on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import suppress

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..db import repository
from ..db.errors import DatabaseError
from ..db.task_events import FinishedTask, Place, ResumeTooOld, finished_after, latest_place, place_of
from ..scopes import Scope
from ..worker.event_hub import CATCH_UP, StreamEnded, Subscription
from . import keys
from .auth import CREDENTIAL, still_admitted
from .errors import ApiError, not_found
from .fastpath import dump_task
from .parsing import parse_digits, path_id
from .responses import encode_json
from .routes import Route

log = logging.getLogger(__name__)

LAST_EVENT_ID = "Last-Event-ID"
_REFUSED = "its token no longer lets it in"
_REPLAY_PAGE = 500


async def user_events(request: web.Request) -> web.StreamResponse:
    user_id = path_id(request, "user_id")
    if await repository.get_user(request.app[keys.POOL], user_id) is None:
        raise not_found("user", user_id)
    return await _stream(request, user_id)


async def all_events(request: web.Request) -> web.StreamResponse:
    return await _stream(request, None)


async def _resume_place(request: web.Request) -> Place | None:
    """The place after which to replay, from Last-Event-ID (0: from the start, as far back as
    positions are kept); None without one."""
    values = request.headers.getall(LAST_EVENT_ID, [])
    if not values:
        return None
    if len(values) > 1:
        # Which one would be the client's place? Taking the first would repeat or skip events.
        raise ApiError(400, "invalid_last_event_id", f"send at most one {LAST_EVENT_ID} header", {"count": len(values)})
    raw = values[0].strip()
    task_id = parse_digits(raw)
    if task_id == 0:
        return (0, 0)
    if task_id is None:
        raise ApiError(
            400, "invalid_last_event_id", f"{LAST_EVENT_ID} must be the id of a task event", {"last_event_id": raw}
        )
    retention = request.app[keys.SETTINGS].event_retention
    try:
        place = await place_of(request.app[keys.POOL], task_id, retention)
    except ResumeTooOld:
        # Like a Kubernetes watch from a resource version that is too old: the client re-reads
        # the state through the REST API and opens a new stream.
        raise ApiError(
            410,
            "last_event_id_expired",
            f"{LAST_EVENT_ID} {raw} is older than the {retention:g} s the streams can resume from; "
            "read the current state through the API and open a new stream without it",
            {"last_event_id": raw, "retention_seconds": retention},
        ) from None
    if place is None:
        raise ApiError(
            400,
            "invalid_last_event_id",
            f"{LAST_EVENT_ID} {raw} is not the id of a finished task",
            {"last_event_id": raw},
        )
    return place


class _EventWriter:
    """Sends events."""

    def __init__(self, response: EventSourceResponse, request: web.Request, user_id: int | None) -> None:
        self._response = response
        self._request = request
        self._pool = request.app[keys.POOL]
        self._hub = request.app[keys.EVENTS]
        self._user_id = user_id
        self.subscription: Subscription | None = None
        self.sent = 0
        # Waiting for a write to the client to go through.
        self.writing = False

    async def send(self, finished: FinishedTask) -> None:
        data = encode_json(dump_task(finished.task))
        # A write only waits when the client does not take the data: the hub must know.
        if self.subscription is not None:
            self.subscription.writing = True
        self.writing = True
        try:
            await self._response.send(data, id=str(finished.task.id))
        finally:
            self.writing = False
            if self.subscription is not None:
                self.subscription.writing = False
        self.sent += 1

    async def replay(self, place: Place) -> Place:
        """Send every finished task after `place` from the database; returns the new place."""
        while True:
            # A replay may be long (from Last-Event-ID, as far back as places are kept): it stops
            # once its request would no longer be let in, as the live part does.
            if not still_admitted(self._request):
                raise StreamEnded(_REFUSED)
            page = await finished_after(self._pool, place, user_id=self._user_id, limit=_REPLAY_PAGE)
            for finished in page:
                # On shutdown every stream ends at once, one replaying too: the client resumes.
                if self._hub.closed:
                    raise StreamEnded("shutdown")
                await self.send(finished)
                place = finished.place
            if len(page) < _REPLAY_PAGE:
                return place


@contextlib.contextmanager
def _while_admitted(request: web.Request, subscription: Subscription) -> Iterator[None]:
    """End the stream once its request would no longer be let in: checked now (a replay may have
    taken a while), after every reload of the token table (a revoke, by this process or another),
    and when its token expires. The client's EventSource reconnects, and gets the 401."""

    def check() -> None:
        if not still_admitted(request):
            subscription.end(_REFUSED)

    loop = asyncio.get_running_loop()
    credential = request.get(CREDENTIAL)
    expiry: asyncio.TimerHandle | None = None

    def at_expiry() -> None:
        # Armed until the token's expiry, and again if it fires early: the loop's timers run on
        # the monotonic clock, the expiry on the wall clock.
        nonlocal expiry
        assert credential is not None and credential.expires_at is not None
        if (left := credential.expires_at - time.time()) > 0:
            expiry = loop.call_later(left, at_expiry)
        else:
            check()

    if credential is not None and credential.expires_at is not None:
        at_expiry()
    try:
        with request.app[keys.TOKENS].on_reload(check):
            check()
            yield
    finally:
        if expiry is not None:
            expiry.cancel()


async def _stream(request: web.Request, user_id: int | None) -> web.StreamResponse:
    app = request.app
    settings, pool, hub = app[keys.SETTINGS], app[keys.POOL], app[keys.EVENTS]
    resume = await _resume_place(request)  # a bad Last-Event-ID is a 400 before any byte is sent
    # A new stream starts after the latest committed batch, read before any byte is sent too: a
    # database that does not answer is a 503, not an empty 200. The replay after subscribing below
    # sends whatever finishes in between.
    place = await latest_place(pool) if resume is None else resume

    response = EventSourceResponse(ping_interval=settings.sse_heartbeat_interval)
    await response.prepare(request)
    writer = _EventWriter(response, request, user_id)

    def cut_off() -> None:
        # A consumer too slow for its buffer: drop the connection now, even mid-write; the
        # client reconnects with Last-Event-ID and catches up from the database.
        log.warning("event stream %s fell %d events behind; disconnecting it", request.path, settings.sse_queue_size)
        if request.transport is not None:
            request.transport.abort()

    def stop() -> None:
        # Shutting down: a stream stuck writing to a client that reads nothing would hold the
        # stop for twice SHUTDOWN_TIMEOUT (aiohttp waits, cancels, then waits for the write
        # again). Drop it; the others end at their next step (below). The client resumes.
        if writer.writing and request.transport is not None:
            request.transport.abort()

    ended = "client gone"
    async with response:
        with hub.streaming(stop):
            try:
                if resume is not None:
                    place = await writer.replay(place)
                with hub.subscribe(user_id, cut_off) as subscription, _while_admitted(request, subscription):
                    writer.subscription = subscription
                    # The heartbeat task ends when a write fails: the client is gone.
                    gone = asyncio.ensure_future(response.wait())
                    gone.add_done_callback(lambda _: subscription.end("client gone"))
                    try:
                        place = await writer.replay(place)
                        # A comment (ignored by EventSource) telling clients that everything from
                        # here on arrives live.
                        await response.write(b": live\r\n\r\n")
                        while True:
                            item = await subscription.next()
                            if item is CATCH_UP:
                                place = await writer.replay(place)
                            elif isinstance(item, FinishedTask) and item.place > place:
                                await writer.send(item)
                                place = item.place
                    finally:
                        gone.cancel()
            except StreamEnded as exc:
                ended = exc.reason
            except (ConnectionError, TimeoutError):  # TimeoutError: a write stalled past aiohttp-sse's limit
                ended = "client gone"
            except DatabaseError as exc:
                # Too late for an error status; the client reconnects with Last-Event-ID.
                ended = f"database error: {exc}"
                log.warning("event stream %s ended: %s", request.path, exc)
            log.debug("event stream %s ended (%s) after %d events", request.path, ended, writer.sent)
    transport = request.transport
    # On shutdown, also a stream whose client has not taken what was written yet: aiohttp's end of
    # the answer would wait for it (up to twice SHUTDOWN_TIMEOUT).
    if transport is not None and (
        ended in ("overflow", "client gone") or (ended == "shutdown" and transport.get_write_buffer_size() > 0)
    ):
        with suppress(Exception):
            transport.abort()
    return response


ROUTES = (
    Route("GET", "/api/v1/user/{user_id}/events", user_events, Scope.READ),
    Route("GET", "/api/v1/events", all_events, Scope.READ),
)
