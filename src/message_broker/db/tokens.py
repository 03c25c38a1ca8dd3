"""API tokens: stored as hashes, and the in-memory table every process checks requests against.

A token's secret is 32 random bytes (`mbt_` + base64url); the database keeps only its SHA-256.
Each process holds the usable tokens in a dict keyed by that digest, loaded at start-up and
reloaded whenever the `api_tokens_changed` notification arrives (migration 0009's trigger fires on
every create, revoke or change, by the service or by hand), after every LISTEN reconnect (a
notification may have been lost) and every `refresh_interval` seconds regardless; a create or
revoke through this process puts the change in the table at once (`added`, `revoked`: made again
on the table of any load that started before it) and also reloads before it answers. Those loads
overlap, so a load that finishes after a later-started one has swapped in is dropped, not swapped
in (it would hide a new token, or keep a revoked one working, until the next reload). A request
costs no query: hash what it presents, look the digest up, compare the expiry with the clock; an
unknown token waits only for a reload that is coming anyway (`settled`, used by http/auth.py).

Why the lookup leaks nothing through its timing: the dict compares the *digest* of what was
presented with the digests it holds (hash first, then bytes). How long that takes depends on how
much of the presented token's digest matches a stored digest, and SHA-256 gives no way to choose
a token whose digest shares a chosen prefix with another's: a token that is right but for its last
byte has a digest as unrelated to the real one as any other guess. So timing tells an attacker
nothing about how much of a real token they have (tests/unit/test_tokens.py measures it too).

last_used_at is written at most once a minute per token and process, by the refresh loop, never
on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ..aio import wait_for_event
from ..scopes import TOKEN_SCOPES, Scope, granted
from .driver import Connection, Notification, Pool, Row
from .errors import DatabaseError, UniqueViolation
from .listener import Listener
from .queries import query

log = logging.getLogger(__name__)

CHANNEL = "api_tokens_changed"
SECRET_PREFIX = "mbt_"
# The name tasks posted with API_TOKEN carry, and the one the service's own tasks carry: no
# stored token may take either.
BOOTSTRAP_NAME = "API_TOKEN"
SERVICE_NAME = "service"
RESERVED_NAMES = frozenset({BOOTSTRAP_NAME, SERVICE_NAME})
# The longest lifetime a token may be given, in seconds (ten years), by the API and the command
# alike: an expiry past the year 9999 is stored by PostgreSQL but cannot be read back by Python,
# and one such row made every reload of the token table fail.
MAX_EXPIRES_IN = 10 * 366 * 24 * 3600
MAX_NAME_LENGTH = 64
LAST_USED_EVERY = 60.0  # seconds: last_used_at is written at most this often per token and process
_FLUSH_EVERY = 5.0  # seconds: how soon a due last_used_at is written


class TokenNameTaken(Exception):
    pass


@dataclass(frozen=True)
class ApiToken:
    """A stored token as the API shows it (never its secret, which is not stored)."""

    id: int
    name: str
    scopes: tuple[Scope, ...]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


def check_name(name: str) -> None:
    """ValueError unless `name` can name a token: 1-64 printable characters, not blank, without
    spaces around it (`t` and `t ` would name two tokens that every log and `created_by` shows
    alike), in Unicode NFC (likewise: "é" as one code point and as "e" + a combining accent are
    the same text, and would otherwise name two tokens), not the service's own names."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"a token name is 1 to {MAX_NAME_LENGTH} characters")
    if not name.isprintable() or not name.strip():
        raise ValueError("a token name is printable characters, not blank")
    if name != name.strip():
        raise ValueError("a token name does not begin or end with a space")
    if unicodedata.normalize("NFC", name) != name:
        raise ValueError("a token name is written in Unicode NFC (composed characters, as most keyboards type them)")
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is the service's own name for tasks; choose another")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _credential(token_id: int, name: str, scopes: Iterable[str], expires_at: datetime | None) -> Credential:
    return Credential(token_id, name, (Scope(s) for s in scopes), expires_at.timestamp() if expires_at else None)


def _token_from_row(row: Row) -> ApiToken:
    return ApiToken(
        id=row["id"],
        name=row["name"],
        scopes=tuple(Scope(s) for s in row["scopes"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def check_expires_in(seconds: int) -> None:
    """ValueError unless a token may be given `seconds` to live: 1 to MAX_EXPIRES_IN."""
    if not 1 <= seconds <= MAX_EXPIRES_IN:
        raise ValueError(f"a token expires in 1 to {MAX_EXPIRES_IN} seconds ({MAX_EXPIRES_IN // 86400}d)")


async def create_token(
    conn: Connection, name: str, scopes: Sequence[Scope], expires_in: int | None = None
) -> tuple[ApiToken, str]:
    """A new token and its secret (shown once: only its hash is kept). Raises TokenNameTaken, or
    ValueError for a lifetime outside 1..MAX_EXPIRES_IN seconds."""
    if name in RESERVED_NAMES:
        raise TokenNameTaken(name)
    if expires_in is not None:
        check_expires_in(expires_in)
    secret = new_secret()
    params = {
        "name": name,
        "secret_hash": digest(secret.encode()),
        "scopes": [s.value for s in scopes],
        "expires_in": expires_in,
    }
    try:
        row = await conn.fetch_one(query("create_api_token"), params)
    except UniqueViolation:
        raise TokenNameTaken(name) from None
    assert row is not None
    return _token_from_row(row), secret


async def list_tokens(conn: Connection) -> list[ApiToken]:
    return [_token_from_row(row) for row in await conn.fetch_all(query("list_api_tokens"))]


async def revoke_token(conn: Connection, token_id: int) -> ApiToken | None:
    """Revoke the token (again: no change); None if there is no such token."""
    row = await conn.fetch_one(query("revoke_api_token"), {"token_id": token_id})
    return _token_from_row(row) if row else None


async def revoke_token_by_name(conn: Connection, name: str) -> ApiToken | None:
    row = await conn.fetch_one(query("revoke_api_token_by_name"), {"name": name})
    return _token_from_row(row) if row else None


class Credential:
    """A usable token as a process keeps it in memory."""

    __slots__ = ("expires_at", "grants", "id", "marked_at", "name", "scopes")

    def __init__(self, token_id: int | None, name: str, scopes: Iterable[Scope], expires_at: float | None) -> None:
        self.id = token_id  # None: the API_TOKEN bootstrap token, which is not stored
        self.name = name
        self.scopes = tuple(scopes)
        self.grants = granted(self.scopes)
        self.expires_at = expires_at  # epoch seconds
        self.marked_at = -LAST_USED_EVERY  # monotonic time last_used_at was last queued


class TokenTable:
    """The usable tokens by the SHA-256 of their secret, kept fresh (see the module's doc)."""

    def __init__(
        self, pool: Pool, listener: Listener, *, bootstrap: str | None = None, refresh_interval: float = 30.0
    ) -> None:
        self._pool = pool
        self._refresh_interval = refresh_interval
        self._bootstrap: dict[bytes, Credential] = {}
        if bootstrap:
            self._bootstrap[digest(bootstrap.encode())] = Credential(None, BOOTSTRAP_NAME, TOKEN_SCOPES, None)
        self._by_digest: dict[bytes, Credential] = dict(self._bootstrap)
        # Until the table is loaded, a token is required: never open by accident.
        self.required = True
        self.loaded = False
        self.reloads = 0
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        # Tokens used since the last write of last_used_at, each with the time of its use.
        self._used: dict[int, datetime] = {}
        # Loads overlap (the refresh loop's, and a create's or revoke's own): each is numbered as it
        # starts, and one that finishes after a later-started one has swapped in keeps out.
        self._started = 0  # the number of the last load that started
        self._swapped = 0  # the number of the load whose table is in use
        self._loading = 0  # loads under way
        self._failing = False  # the last reload of the refresh loop failed
        self._swap = asyncio.Event()  # set, and replaced, at every swap
        # Changes this process made (a create, a revoke), each with the number of the last load
        # that had started when it was made: a load up to that number may have read before it,
        # so the change is made again on that load's table.
        self._edits: list[tuple[int, Callable[[dict[bytes, Credential]], None]]] = []
        self._on_reload: dict[object, Callable[[], None]] = {}
        listener.route(CHANNEL, self._notified)
        listener.on_connected(self.changed)

    def lookup(self, presented: bytes) -> Credential | None:
        """The usable token whose secret is `presented`, or None. Costs one SHA-256 and one dict
        lookup, whatever is presented and however many tokens there are."""
        found = self._by_digest.get(digest(presented))
        if found is None or (found.expires_at is not None and time.time() >= found.expires_at):
            return None
        if found.id is not None:
            now = time.monotonic()
            if now - found.marked_at >= LAST_USED_EVERY:
                found.marked_at = now
                self._used[found.id] = datetime.now(UTC)
        return found

    def __len__(self) -> int:
        return len(self._by_digest)

    def changed(self) -> None:
        """Reload soon (a notification, or a reconnect after which one may have been lost)."""
        self._changed.set()

    def _notified(self, _notification: Notification) -> None:
        self.changed()

    async def load(self) -> None:
        """Read the usable tokens and swap them in whole: on return, the table holds every change
        committed before the call (a load that read earlier and finishes later is dropped)."""
        self._started += 1
        number = self._started
        self._loading += 1
        try:
            async with self._pool.acquire() as conn, conn.transaction(snapshot=True):
                rows = await conn.fetch_all(query("usable_api_tokens"))
                exists = await conn.fetch_one(query("api_tokens_exist"))
        finally:
            self._loading -= 1
        if number < self._swapped:
            return
        old = {c.id: c for c in self._by_digest.values() if c.id is not None}
        table = dict(self._bootstrap)
        for row in rows:
            credential = _credential(row["id"], row["name"], row["scopes"], row["expires_at"])
            if row["id"] in old:
                credential.marked_at = old[row["id"]].marked_at
            table[bytes(row["secret_hash"])] = credential
        self._edits = [(made_after, edit) for made_after, edit in self._edits if made_after >= number]
        for _, edit in self._edits:
            edit(table)
        self._swapped = number
        self.loaded = True
        self.reloads += 1
        self._failing = False
        # An edit still kept is a token row (created, or revoked: those count) the load may have missed.
        self._swap_in(table, bool(self._bootstrap) or bool(exists and exists["present"]) or bool(self._edits))

    def added(self, token: ApiToken, secret: str) -> None:
        """This process created `token`: usable here at once, before any reload (which may fail)."""
        key, credential = digest(secret.encode()), _credential(token.id, token.name, token.scopes, token.expires_at)

        def add(table: dict[bytes, Credential]) -> None:
            table[key] = credential

        self._edit(add, required=True)

    def revoked(self, token_id: int) -> None:
        """This process revoked the token: refused here at once, before any reload (which may fail)."""

        def revoke(table: dict[bytes, Credential]) -> None:
            for key in [key for key, c in table.items() if c.id == token_id]:
                del table[key]

        self._edit(revoke, required=self.required)

    def _edit(self, edit: Callable[[dict[bytes, Credential]], None], *, required: bool) -> None:
        self._edits.append((self._started, edit))
        table = dict(self._by_digest)
        edit(table)
        self._swap_in(table, required)

    def _swap_in(self, table: dict[bytes, Credential], required: bool) -> None:
        self._by_digest = table
        self.required = required
        self._swap.set()
        self._swap = asyncio.Event()
        for callback in list(self._on_reload.values()):
            try:
                callback()
            except Exception:  # one stream's check must not fail the reload, or a token's create
                log.exception("api_tokens on_reload callback failed")

    def reload_coming(self) -> bool:
        """Whether a reload is due (a change was heard of) or under way; not while reloads fail
        (the database is away: nothing would come) or the service stops."""
        if self._stop.is_set():
            return False
        return (self._changed.is_set() and not self._failing) or self._loading > 0

    async def settled(self, timeout: float = 1.0) -> None:
        """Return once a reload that starts from now on has swapped in (at most `timeout` seconds):
        a token created a moment ago through another process, heard of and not loaded yet, is in
        the table then. It costs no query of its own."""
        target = self._started + 1 if self._changed.is_set() else self._started
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._swapped < target and (remaining := deadline - loop.time()) > 0:
            await wait_for_event(self._swap, remaining)

    @contextlib.contextmanager
    def on_reload(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call `callback` after every reload that swaps a new table in, while in the block (an
        event stream checks that its token still lets it in)."""
        key = object()
        self._on_reload[key] = callback
        try:
            yield
        finally:
            del self._on_reload[key]

    async def flush_last_used(self) -> None:
        if not self._used:
            return
        used, self._used = self._used, {}
        ids = sorted(used)
        # Each token's own time of use, not the time of this write: a write comes up to seconds
        # later (or, the database away, minutes), when the token may have been revoked meanwhile.
        params = {"token_ids": ids, "used_at": [used[token_id].isoformat() for token_id in ids]}
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(query("mark_api_tokens_used"), params)
        except DatabaseError:
            self._used = {**used, **self._used}  # next time
            raise

    def interrupt(self) -> None:
        self._stop.set()
        self._changed.set()

    async def run(self) -> None:
        """Reload on every change and every refresh_interval; write last_used_at when due."""
        loop = asyncio.get_running_loop()
        loaded_at = loop.time()
        while not self._stop.is_set():
            await wait_for_event(self._changed, _FLUSH_EVERY)
            if self._stop.is_set():
                return
            try:
                if self._changed.is_set() or loop.time() - loaded_at >= self._refresh_interval:
                    self._changed.clear()
                    await self.load()
                    loaded_at = loop.time()
                await self.flush_last_used()
            except DatabaseError as exc:
                # Keep what we have; the next round tries again (a reconnect also asks for it).
                log.warning("api_tokens reload_failed error=%r", str(exc))
                self._failing = True
                self._changed.set()
                await wait_for_event(self._stop, 1.0)
