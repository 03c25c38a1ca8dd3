"""The webhook sender: every delivery in the outbox POSTed to its endpoint, signed per Standard
Webhooks 1.0, retried on a schedule, recorded.

    apply transaction --(trigger at COMMIT)--> webhook_deliveries rows + NOTIFY webhook_delivery
    NOTIFY, a lane running low, the timer --> claim due deliveries (SKIP LOCKED, with a lease)
    claimed --> an endpoint's lanes: signed POSTs one after another on kept-alive connections
        (own ClientSession, WEBHOOK_TIMEOUT, no redirects) --> results recorded many at a time
    no delivery due --> one timer for the next due one (a retry, a lease that ends), not a poll
    the apply has a backlog --> no claims until it ends (give_way: at most WEBHOOK_GIVE_WAY s)

Concurrency: at most `concurrency` requests in flight in this process and `per_endpoint` to any
one endpoint, so a slow or dead endpoint never holds up the others. One endpoint's rate is then
per_endpoint / (its answer time): the database work (claims, results) goes in batches beside the
requests, never between two of them. A claimed delivery whose process dies is due again once its
lease ends: delivery is at least once, and each event keeps its webhook-id on every attempt, so
receivers dedupe by it. A claimed delivery whose lease would end before its attempt could (it
waited behind slow answers) is given back instead, uncounted: no attempt outlives its lease.

Hosts are checked at every attempt: an IP literal here, a name by the connector's resolver,
whose answer is the address connected to (no second lookup a DNS change could slip through).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import ipaddress
import logging
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from ..aio import Backoff, wait_for_event
from ..batching import Coalescer
from ..config import Settings, webhook_retry_delays
from ..db import webhooks as store
from ..db.driver import Pool
from ..db.errors import DatabaseError
from ..models import Task
from .tasks import BackgroundTasks

log = logging.getLogger(__name__)

WEBHOOK_DELIVERY = "webhook_delivery"
# The payload of a webhook_delivery notification about an endpoint's change (migration 0013),
# followed by its id; any other payload is a plain wake-up.
ENDPOINT_CHANGED = "endpoint "
USER_AGENT = "message_broker"
PER_ENDPOINT = 4
# Claimed deliveries per lane: one claim feeds an endpoint's lanes for a while, so that claims
# (round trips and commits) are a small fraction of the deliveries. An endpoint whose last attempt
# failed gets one per lane: its deliveries would only wait behind timeouts.
PREFETCH = 64
# A claim's lease, in WEBHOOK_TIMEOUTs (plus _RECORD_MARGIN): an attempt starts only while its
# lease has a timeout and the margin left, so this bounds how long a claim may wait in a lane.
LEASE_TIMEOUTS = 9
# Room for the result to be recorded after an attempt's timeout, within the lease.
_RECORD_MARGIN = 5.0
# The longest a result waits to be recorded with others.
_RECORD_LINGER = 0.05
MAX_URL_LENGTH = 2048
# A Retry-After (429, 503) is honoured up to this many seconds.
MAX_RETRY_AFTER = 3600.0
JITTER = 0.2
# A due delivery another process is claiming right now (locked): look again this soon.
_SOON = 0.05
# Giving way to a backlog of the apply: held back at most half the time, and at most once this
# often (a backlog that comes and goes does not make the sender stutter).
_GIVE_WAY_GAP = 1.0
# Shutting down, attempts in flight get this long before they are cancelled.
_SHUTDOWN_GRACE = 2.0
_MAX_ANSWER_READ = 64 * 1024  # bytes of an answer's body read so that its connection is kept alive


# -- URLs and addresses ------------------------------------------------------------------------------


class InvalidUrl(ValueError):
    """Not an http(s) URL with a host and without credentials, or too long."""


class UrlNotAllowed(ValueError):
    """The host is, or resolves to, an address webhooks may not reach."""


def parse_url(raw: str) -> URL:
    """`raw` as a webhook URL, or InvalidUrl saying why."""
    if len(raw) > MAX_URL_LENGTH:
        raise InvalidUrl(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if not raw.isascii() or not raw.isprintable() or " " in raw:
        raise InvalidUrl("the URL must be printable ASCII without spaces (write a non-ASCII host as punycode)")
    try:
        url = URL(raw)
        port = url.port
        # yarl decodes an xn-- label only when the host is read: one that is not valid punycode
        # (xn--zz) raises UnicodeError, a ValueError, here.
        host = url.host
    except (ValueError, IndexError) as exc:
        # IndexError: yarl's own split of a netloc with brackets and a trailing "@" (http://a@b[]@)
        raise InvalidUrl(f"the URL cannot be read: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise InvalidUrl("the URL must start with http:// or https://")
    if not host:
        raise InvalidUrl("the URL has no host")
    if not _host_well_formed(raw, url.raw_host or host):
        # Refused here whatever WEBHOOK_ALLOW_PRIVATE says (allowed, hosts are not looked up at
        # registration): such a host can never be connected to.
        raise InvalidUrl("the URL's host is not a valid name or address (a label of 1-63 characters between dots)")
    if url.user is not None or url.password is not None:
        raise InvalidUrl("the URL must not carry credentials (user:password@)")
    if port is None or not 0 < port < 65536:
        raise InvalidUrl("the URL's port must be 1..65535")
    return url


def _host_well_formed(raw: str, host: str) -> bool:
    """A bracketed host is an IPv6 address (yarl drops the brackets of `[v1.fe]`); any other is
    an IPv4 address or a DNS name of labels of 1-63 characters, 253 in all (`a..b` cannot be
    looked up)."""
    authority = raw.partition("//")[2].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "[" in authority:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split("."))


# Every attempt reads its endpoint's URL again (it may have been changed), mostly the same few.
_parsed_url = functools.lru_cache(maxsize=1024)(parse_url)


_NOT_PUBLIC_V6 = (ipaddress.IPv6Network("fec0::/10"), ipaddress.IPv6Network("3fff::/20"))
# IETF protocol assignments (RFC 6890): not globally reachable but for two anycast addresses.
# Python before 3.12.4 counts only 192.0.0.0/29 and 192.0.0.170/31 of them as private.
_IETF_PROTOCOL_ASSIGNMENTS = ipaddress.IPv4Network("192.0.0.0/24")
_GLOBAL_IN_IETF_ASSIGNMENTS = (ipaddress.IPv4Address("192.0.0.9"), ipaddress.IPv4Address("192.0.0.10"))


def address_refused(address: str) -> str | None:
    """Why webhooks may not reach this IP address (loopback, private, ...), or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is not part of it
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # What Python's ipaddress counts as global but is not: site-local (deprecated, still
        # routed inside some networks) and RFC 9637's documentation range.
        if any(ip in network for network in _NOT_PUBLIC_V6):
            return f"{address} is not a public address"
        # An IPv4 address reached through IPv6 (mapped, or 6to4's 2002::/16) is judged as itself.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if not ip.is_global or (ip in _IETF_PROTOCOL_ASSIGNMENTS and ip not in _GLOBAL_IN_IETF_ASSIGNMENTS):
        # shared address space (100.64/10) and the like
        return f"{address} is not a public address"
    return None


async def check_url(raw: str, *, allow_private: bool, timeout: float = 5.0) -> URL:
    """A URL a webhook may be registered with: parse it (InvalidUrl) and, unless private
    addresses are allowed, resolve its host and refuse it if any address is not public
    (UrlNotAllowed); a host that does not resolve is InvalidUrl."""
    url = parse_url(raw)
    assert url.host is not None and url.port is not None
    host = url.host
    if not allow_private:
        if (reason := address_refused(host)) is not None:
            raise UrlNotAllowed(reason)
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError, UnicodeError):
            raise InvalidUrl(f"the host {host} does not resolve") from None
        for info in infos:
            if (reason := address_refused(str(info[4][0]))) is not None:
                raise UrlNotAllowed(f"{host} resolves to {reason}")
    # A host of digits and dots is an IPv4 address to aiohttp, which connects only to one written
    # as four decimal numbers without leading zeros: 2130706433, 127.1, 010.0.0.1 or 1.2.3.4. would
    # resolve here and then fail every delivery (InvalidUrlClientError).
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidUrl(
                f"the host {host} is not an IPv4 address as webhooks are sent to one: write it as four "
                "decimal numbers without leading zeros (1.2.3.4)"
            ) from None
    return url


class _PublicResolver(ThreadedResolver):
    """The connector's resolver: refuses a name any of whose addresses is not public."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        for result in found:
            if (reason := address_refused(result["host"])) is not None:
                raise UrlNotAllowed(f"{host} resolves to {reason}")
        return found


# -- signing -------------------------------------------------------------------------------------------


def secret_text(secret: bytes) -> str:
    return "whsec_" + base64.b64encode(secret).decode("ascii")


def sign(secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` for each
    secret, space-separated (during a rotation, the new key's and the old one's)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(secret, signed, "sha256")).decode("ascii") for secret in secrets
    )


# -- the sender ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderSettings:
    timeout: float
    retry_delays: tuple[float, ...]
    disable_after: float
    concurrency: int
    allow_private: bool
    max_wait: float  # re-read the database at least this often (a lost notification)
    max_backoff: float = 5.0
    per_endpoint: int = PER_ENDPOINT
    give_way: float = 5.0  # seconds at most that a backlog of the apply holds claims back

    @classmethod
    def from_settings(cls, settings: Settings) -> SenderSettings:
        return cls(
            timeout=settings.webhook_timeout,
            retry_delays=webhook_retry_delays(settings.webhook_retry_schedule),
            disable_after=settings.webhook_disable_after,
            concurrency=settings.webhook_concurrency,
            allow_private=settings.webhook_allow_private,
            max_wait=settings.sweep_interval,
            max_backoff=settings.reconnect_max_backoff,
            give_way=settings.webhook_give_way,
        )

    @property
    def budget(self) -> int:
        """Deliveries of one endpoint this process holds at most: in its lanes or queued."""
        return self.per_endpoint * PREFETCH

    @property
    def lease(self) -> float:
        return LEASE_TIMEOUTS * self.timeout + _RECORD_MARGIN

    @property
    def start_within(self) -> float:
        """Seconds after its claim an attempt may still start: its timeout and the recording
        then fit in the lease."""
        return self.lease - self.timeout - _RECORD_MARGIN


def retry_after_seconds(header: str | None, now: float) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds from now, capped; None if absent
    or unreadable."""
    if not header:
        return None
    header = header.strip()
    # ASCII digits only: str.isdigit() is also true of "²", which float() cannot read.
    if header.isascii() and header.isdigit():
        seconds = float(header)
    else:
        try:
            seconds = parsedate_to_datetime(header).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class _Queued(NamedTuple):
    """A claimed delivery waiting for its lane."""

    delivery: store.Claimed
    start_by: float  # loop time: the last moment its attempt may start, for its lease
    changes: int  # endpoint changes heard when it was claimed


class WebhookSender:
    def __init__(
        self,
        pool: Pool,
        tasks: BackgroundTasks,
        settings: SenderSettings,
        *,
        dump_task: Callable[[Task], dict[str, Any]],
        encode_json: Callable[[Any], str],
        on_result: Callable[[str, float | None], None] = lambda result, lag: None,
    ) -> None:
        self._pool = pool
        self._tasks = tasks
        self._settings = settings
        # The one task serializer and JSON encoder (the API's), handed down: the body's `data` is
        # the task exactly as GET /api/v1/task/<id> shows it.
        self._dump_task = dump_task
        self._encode_json = encode_json
        self._on_result = on_result
        self._wake = asyncio.Event()
        self._reread = False
        # Per endpoint: claimed deliveries waiting for a lane (each with the last moment its
        # attempt may start, loop time), and lanes (at most per_endpoint) sending them one after
        # another; every request also takes one of `concurrency` slots.
        self._queued: dict[int, deque[_Queued]] = {}
        # Endpoint changes heard (endpoint_changed), and the last one of each endpoint: a delivery
        # claimed before its endpoint's last change is not attempted (see _deliver).
        self._changes = 0
        self._changed_at: dict[int, int] = {}
        self._lanes: Counter[int] = Counter()
        # Endpoints whose latest attempt here failed: claimed one per lane until one succeeds.
        self._failing: set[int] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.concurrency)
        # Giving way to the apply's backlog: since when claims wait (loop time; they wait at most
        # settings.give_way), and the earliest moment another hold may begin.
        self._held_since: float | None = None
        self._hold_allowed_at = 0.0
        # Nobody waits on a result being recorded (the lane has gone on): results linger to go in
        # a few large statements; a lease is far longer than that. No task per result: a batch
        # retries its statement itself while the database is away.
        self._recorder: Coalescer[_Outcome, None] = Coalescer(
            self._record, name="webhook-results", max_batch=500, max_in_flight=2, linger=_RECORD_LINGER
        )
        self.delivered = 0

    def start(self) -> None:
        self._tasks.start("webhook-sender", self._run, interrupt=self._wake.set)

    def poke(self) -> None:
        """Read the database again now: a `webhook_delivery` notification, a lane running low, or
        the LISTEN connection back (notifications sent while it was down are lost)."""
        self._reread = True
        self._wake.set()

    def endpoint_changed(self, endpoint_id: int) -> None:
        """The endpoint's URL, keys or status changed, or it was deleted: what this process claimed
        for it and has not sent yet goes back (uncounted), and the next claim takes the endpoint
        as it is now, or not at all. An attempt under way finishes."""
        self._changes += 1
        self._changed_at[endpoint_id] = self._changes
        queued = self._queued.get(endpoint_id)
        if queued:
            self._give_back([waiting.delivery for waiting in queued])
            queued.clear()
        self.poke()

    def give_way(self, backlog: bool) -> None:
        """The service's apply has a backlog (True), or has caught up (False). Money first: while
        the backlog lasts no new deliveries are claimed (those claimed before it are still sent;
        what a claim under way when it began takes is given back), for at
        most `give_way` seconds at a stretch and at most half the time; then they go beside it.
        Two cores shared by the apply and the sender drained a backlog a quarter slower."""
        now = asyncio.get_running_loop().time()
        if backlog:
            if self._held_since is None and self._settings.give_way > 0 and now >= self._hold_allowed_at:
                self._held_since = now
        elif self._held_since is not None:
            self._end_hold(now)
            self.poke()

    def _end_hold(self, now: float) -> None:
        assert self._held_since is not None
        since = self._held_since
        ended = min(now, since + self._settings.give_way)
        self._hold_allowed_at = ended + max(ended - since, _GIVE_WAY_GAP)
        self._held_since = None
        log.info("webhooks gave_way_s=%.2f reason=apply_backlog", ended - since)

    def _busy(self, endpoint_id: int) -> int:
        """Deliveries of an endpoint this process holds: in a lane or waiting for one."""
        return self._lanes[endpoint_id] + len(self._queued.get(endpoint_id, ()))

    def _budget(self, endpoint_id: int) -> int:
        """Deliveries of an endpoint this process may hold."""
        s = self._settings
        return s.per_endpoint if endpoint_id in self._failing else s.budget

    def _session(self) -> aiohttp.ClientSession:
        s = self._settings
        connector = aiohttp.TCPConnector(
            limit=s.concurrency,
            # Every attempt resolves the name again: DNS may change, and the answer is checked.
            use_dns_cache=False,
            resolver=None if s.allow_private else _PublicResolver(),
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=s.timeout),
            headers={"User-Agent": USER_AGENT},
            # Receivers' cookies are not ours to keep.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def _run(self) -> None:
        stopping = self._tasks.stopping
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.1, self._settings.max_backoff)
        session = self._session()
        try:
            while not stopping.is_set():
                self._reread = False
                self._wake.clear()
                try:
                    wait = await self._claim(session)
                except DatabaseError as exc:
                    pause = backoff.pause()
                    log.warning("webhooks claim_failed error=%r retry_in_s=%.1f", str(exc), pause)
                    await wait_for_event(self._wake, pause)
                    continue
                backoff.reset()
                target = loop.time() + wait
                while not (stopping.is_set() or self._reread) and (remaining := target - loop.time()) > 0:
                    self._wake.clear()
                    await wait_for_event(self._wake, remaining)
        finally:
            await self._finish_in_flight()
            await self._recorder.close(timeout=_SHUTDOWN_GRACE)
            await session.close()

    async def _claim(self, session: aiohttp.ClientSession) -> float:
        """Claim every due delivery there is room for and hand them to lanes; seconds until it is
        worth looking again."""
        s = self._settings
        if self._held_since is not None:
            now = asyncio.get_running_loop().time()
            if (left := self._held_since + s.give_way - now) > 0:
                return left  # the end of the backlog wakes us sooner
            self._end_hold(now)
        busy = {
            endpoint_id: n for endpoint_id in set(self._lanes) | set(self._queued) if (n := self._busy(endpoint_id))
        }
        free = s.concurrency * PREFETCH - sum(busy.values())
        if free <= 0:
            return s.max_wait  # a lane running low wakes the loop
        room = {
            endpoint_id: max(self._budget(endpoint_id) - busy.get(endpoint_id, 0), 0)
            for endpoint_id in busy.keys() | self._failing
        }
        # Both taken before the claim: its lease starts, and its snapshot of the endpoints is read,
        # after them.
        start_by = asyncio.get_running_loop().time() + s.start_within
        changes = self._changes
        claimed = await store.claim_due(self._pool, limit=free, per_endpoint=s.budget, room=room, lease=s.lease)
        if self._held_since is not None:
            # The backlog began while the claim was under way. Its snapshot may hold the backlog's
            # deliveries: a sender in a process of its own hears of the backlog a little late, and
            # a claim may wait for the database longer than a transaction of the apply takes.
            # What it took goes back, uncounted, and waits with the rest.
            if claimed:
                self._give_back(claimed)
            return 0.0  # the next look sees the hold
        for delivery in claimed:
            self._queued.setdefault(delivery.endpoint_id, deque()).append(_Queued(delivery, start_by, changes))
        for endpoint_id in {delivery.endpoint_id for delivery in claimed}:
            while self._lanes[endpoint_id] < s.per_endpoint and self._queued.get(endpoint_id):
                self._lanes[endpoint_id] += 1
                task = asyncio.create_task(self._lane(session, endpoint_id), name=f"webhook-lane-{endpoint_id}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        if len(claimed) == free:
            return 0.0  # maybe more due: look again at once
        # Endpoints whose every place is taken are not waited for: their lanes wake us.
        saturated = [endpoint_id for endpoint_id in busy if self._busy(endpoint_id) >= self._budget(endpoint_id)]
        seconds = await store.next_due(self._pool, saturated)
        if seconds is None:
            return s.max_wait
        return min(max(seconds, _SOON), s.max_wait)

    async def _lane(self, session: aiohttp.ClientSession, endpoint_id: int) -> None:
        """Send an endpoint's claimed deliveries one after another, until none is left."""
        queued = self._queued[endpoint_id]
        try:
            while queued:
                waiting = queued.popleft()
                if not await self._deliver(session, waiting):
                    # Its lease would end before the attempt could, or its endpoint changed: it and
                    # what was claimed after it go back, uncounted, and fresh claims follow.
                    self._give_back([waiting.delivery, *(later.delivery for later in queued)])
                    queued.clear()
                    self.poke()
                    break
                # Running low (or out): claim more.
                if self._busy(endpoint_id) - 1 in (self._budget(endpoint_id) // 2, 0):
                    self.poke()
        finally:
            self._lanes[endpoint_id] -= 1
            if self._lanes[endpoint_id] <= 0:
                del self._lanes[endpoint_id]
                if not queued:
                    self._queued.pop(endpoint_id, None)

    def _give_back(self, claimed: list[store.Claimed]) -> None:
        task = asyncio.create_task(self._released(claimed), name="webhook-release")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _released(self, claimed: list[store.Claimed]) -> None:
        try:
            await store.release(self._pool, claimed)
        except DatabaseError as exc:
            # Their leases bring them back (counted as attempts then).
            log.warning("webhook release_failed deliveries=%d error=%r", len(claimed), str(exc))

    async def _finish_in_flight(self) -> None:
        """Shutting down: what waits for a lane is given back (or, failing that, left to its
        lease); the attempts in flight get a moment, then are cancelled (their leases bring them
        back to whichever process runs then: at least once)."""
        waiting = [claimed.delivery for queued in self._queued.values() for claimed in queued]
        for queued in self._queued.values():
            queued.clear()
        if waiting:
            self._give_back(waiting)
        running = self._running | self._releasing
        if not running:
            return
        _done, pending = await asyncio.wait(running, timeout=min(self._settings.timeout, _SHUTDOWN_GRACE))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    async def _deliver(self, session: aiohttp.ClientSession, waiting: _Queued) -> bool:
        """Attempt the delivery; False, without an attempt, if its lease would end before the
        attempt could, or its endpoint changed since it was claimed (a claim under way then read
        the endpoint as it was). Checked once the attempt has its slot: the wait for one (behind
        other endpoints' slow answers) counts."""
        delivery, start_by = waiting.delivery, waiting.start_by
        async with self._slots:
            if asyncio.get_running_loop().time() > start_by:
                return False
            if self._changed_at.get(delivery.endpoint_id, 0) > waiting.changes:
                return False
            result = await self._attempt(session, delivery)
        if result.outcome == "delivered":
            self._failing.discard(delivery.endpoint_id)
        else:
            self._failing.add(delivery.endpoint_id)
        # The lane goes on to its next delivery while this result is recorded (with others, in one
        # statement): a round trip per delivery would otherwise pace every lane.
        lease_ends = start_by + self._settings.timeout + _RECORD_MARGIN
        self._recorder.enqueue(_Outcome(delivery, result, lease_ends)).add_done_callback(_retrieve)
        return True

    def body(self, event_type: str, task: Task) -> bytes:
        """The event as sent: its type, its time (when the task finished) and the task."""
        assert task.processed_at is not None
        payload = {"type": event_type, "timestamp": task.processed_at.isoformat(), "data": self._dump_task(task)}
        return self._encode_json(payload).encode()

    async def _attempt(self, session: aiohttp.ClientSession, delivery: store.Claimed) -> store.AttemptResult:
        body = self.body(delivery.event_type, delivery.task)
        attempted_at = datetime.now(UTC)
        timestamp = int(attempted_at.timestamp())
        headers = {
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(delivery.secrets, delivery.webhook_id, timestamp, body),
            "Content-Type": "application/json",
        }
        started = time.perf_counter()
        status: int | None = None
        retry_after: float | None = None
        error: str | None = None
        try:
            url = _parsed_url(delivery.url)
            if not self._settings.allow_private and url.host and (reason := address_refused(url.host)):
                raise UrlNotAllowed(reason)
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                if status in (429, 503):
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"), time.time())
                # The answer's body is not used, but read to its end (a short one) so that the
                # connection is kept alive for the next delivery: aiohttp closes a connection
                # whose answer was left unread. A long body is left: the connection closes.
                # The status is the answer: a body that stalls past the timeout or breaks off
                # only closes the connection, and is not the attempt's error.
                read = 0
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    while read <= _MAX_ANSWER_READ and (chunk := await response.content.readany()):
                        read += len(chunk)
        except TimeoutError:
            error = f"no answer within {self._settings.timeout:g} s"
        except (InvalidUrl, UrlNotAllowed) as exc:
            error = f"refused: {exc}"
        except aiohttp.ClientError as exc:
            error = _describe(exc)
        except Exception as exc:  # a failed attempt, never a dead lane (its deliveries would wait for their lease)
            log.exception("webhook attempt_failed delivery=%d", delivery.delivery_id)
            error = f"{type(exc).__name__}: {exc}"[:500]
        duration_ms = (time.perf_counter() - started) * 1000
        result = store.AttemptResult(
            delivery.delivery_id,
            delivery.endpoint_id,
            delivery.attempt,
            "delivered",
            attempted_at,
            duration_ms,
            http_status=status,
            error=error,
        )
        if status is not None and 200 <= status < 300:
            return result
        if status is not None and error is None:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        if status == 410:
            return replace(result, outcome="failed", error=error, gone=True)
        # The place in the schedule, not the attempt's number: a replay starts the schedule again,
        # and a manual retry (None) is one attempt.
        delays = self._settings.retry_delays
        place = delivery.schedule_attempt
        if place is None or place > len(delays):
            return replace(result, outcome="failed", error=error)
        delay = delays[place - 1] * random.uniform(1 - JITTER, 1 + JITTER)
        if retry_after is not None:
            delay = retry_after
        return replace(result, outcome="retry", error=error, retry_in=delay)

    async def _record(self, outcomes: list[_Outcome]) -> list[None]:
        """Record results in one statement, trying again while the database is away and the
        earliest lease lasts (else those deliveries are sent again after their leases: at least
        once, never lost); then count them."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.1, self._settings.max_backoff)
        results = [outcome.result for outcome in outcomes]
        while True:
            try:
                recorded = await store.record_attempts(self._pool, results, self._settings.disable_after)
                break
            except DatabaseError as exc:
                pause = backoff.pause()
                lease_ends = min(outcome.lease_ends for outcome in outcomes)
                if self._tasks.stopping.is_set() or loop.time() + pause >= lease_ends - 1.0:
                    log.warning(
                        "webhook record_failed deliveries=%d error=%r retry_after_lease_s=%.0f",
                        len(outcomes),
                        str(exc),
                        max(lease_ends - loop.time(), 0.0),
                    )
                    return [None] * len(outcomes)
                await wait_for_event(self._tasks.stopping, pause)
        if any(result.outcome == "retry" for result in results):
            # A retry's due time exists only now: the timer may have to be re-armed earlier.
            self.poke()
        for endpoint_id in recorded.disabled_endpoints:
            log.warning("webhook endpoint=%d disabled=yes", endpoint_id)
        for delivery, result, _ in outcomes:
            lag = None
            if result.outcome == "delivered" and delivery.task.processed_at is not None:
                lag = max((result.attempted_at - delivery.task.processed_at).total_seconds(), 0.0)
                lag += result.duration_ms / 1000
                self.delivered += 1
            self._on_result(result.outcome, lag)
        return [None] * len(outcomes)


class _Outcome(NamedTuple):
    """An attempt's result waiting to be recorded, with the delivery it is of and when the
    claim's lease ends (loop time): recording may be retried until shortly before then."""

    delivery: store.Claimed
    result: store.AttemptResult
    lease_ends: float


def _retrieve(future: asyncio.Future[None]) -> None:
    """Nobody awaits a recording; a batch cancelled at shutdown must not be logged as an
    exception never retrieved (the lease brings those deliveries back)."""
    if not future.cancelled():
        future.exception()


def _describe(exc: aiohttp.ClientError) -> str:
    """A short reason for a failed request, without a traceback."""
    cause = exc
    with contextlib.suppress(AttributeError):
        if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, UrlNotAllowed):
            return f"refused: {exc.os_error}"
    text = str(cause).strip() or type(cause).__name__
    return f"{type(cause).__name__}: {text}"[:500]


def changed_endpoint(payload: str) -> int | None:
    """The endpoint a webhook_delivery notification says changed; None for a plain wake-up."""
    if not payload.startswith(ENDPOINT_CHANGED):
        return None
    digits = payload.removeprefix(ENDPOINT_CHANGED)
    return int(digits) if digits.isascii() and digits.isdigit() else None
