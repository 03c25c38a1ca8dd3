"""PgBouncer (Debian's package) in transaction pooling in front of a PostgreSQL: for `make
pgbouncer-up` / `make pgbouncer-down` (in front of the database `make run` uses), `make
test-pgbouncer` (in front of the test server) and the many-processes scenario (which restarts it).

    python -m tests.pgbouncer.bouncer up     # prints DATABASE_URL=... and LISTEN_DATABASE_URL=... last
    python -m tests.pgbouncer.bouncer down

Every database of the server is reachable through it under its own name (a `*` entry), as the
one login role of the server's DSN: the service's pool points at it, its LISTEN connection does
not (LISTEN_DATABASE_URL: the server itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

BINARY = "/usr/sbin/pgbouncer"
DEFAULT_DIR = Path(os.environ.get("PGBOUNCER_DIR", "/tmp/message_broker-pgbouncer"))
DEFAULT_PORT = int(os.environ.get("PGBOUNCER_PORT", "6432"))


def installed() -> bool:
    return os.access(BINARY, os.X_OK)


class PgBouncer:
    """One PgBouncer process: its configuration and files live in `directory`."""

    def __init__(
        self, upstream: str, directory: Path, port: int, *, pool_size: int = 20, pool_mode: str = "transaction"
    ) -> None:
        self.upstream = upstream  # a DSN of the server: host, port, user and password are used
        self.directory = directory
        self.port = port
        self.pool_size = pool_size
        self.pool_mode = pool_mode
        params = psycopg2.extensions.parse_dsn(upstream)
        self._host = params.get("host") or "/var/run/postgresql"
        self._server_port = params.get("port") or "5432"
        self.user = params.get("user") or pwd.getpwuid(os.getuid()).pw_name
        self._password = params.get("password") or ""

    @property
    def pidfile(self) -> Path:
        return self.directory / "pgbouncer.pid"

    @property
    def logfile(self) -> Path:
        return self.directory / "pgbouncer.log"

    def config(self) -> str:
        target = f"host={self._host} port={self._server_port} user={self.user}"
        if self._password:
            target += f" password={self._password}"
        return f"""\
[databases]
; every database of the server, under its own name, as the server DSN's role
* = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
; the server's own authentication stands behind it; a local test and development setup
auth_type = any
admin_users = {self.user}
; a server connection serves one transaction, then the next client: no session state survives
pool_mode = {self.pool_mode}
; server connections per database (and user): processes x POOL_MAX_SIZE share these
default_pool_size = {self.pool_size}
max_client_conn = 1000
; used only in session pooling; the service leaves nothing to reset
server_reset_query =
; a server that refused a login (restarting) is tried again after 1 s, not the default 15 s
server_login_retry = 1
; the test suite makes many short-lived databases: let their idle server connections go
server_idle_timeout = 20
logfile = {self.logfile}
pidfile = {self.pidfile}
"""

    def _run_as(self) -> str | None:
        """PgBouncer refuses to run as root: as root, it runs as the owner of the server's socket
        directory (the embedded server's user) or as `postgres`."""
        if os.geteuid() != 0:
            return None
        if self._host.startswith("/"):
            owner = pwd.getpwuid(Path(self._host).stat().st_uid).pw_name
            if owner != "root":
                return owner
        return "postgres"

    def pid(self) -> int | None:
        """The running PgBouncer's process id, or None."""
        try:
            pid = int(self.pidfile.read_text().strip())
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ValueError):
            return None
        # A killed process can linger as a zombie here: it is not running.
        state = next((line for line in status.splitlines() if line.startswith("State:")), "")
        return None if "Z" in state.split(":", 1)[-1].split()[:1] else pid

    def start(self, timeout: float = 20.0) -> None:
        if self.pid() is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "pgbouncer.ini").write_text(self.config())
        user = self._run_as()
        command = [BINARY, "-d", "-q"]
        if user is not None:
            record = pwd.getpwnam(user)
            os.chown(self.directory, record.pw_uid, record.pw_gid)
            for path in self.directory.iterdir():
                os.chown(path, record.pw_uid, record.pw_gid)
            command += ["-u", user]
        subprocess.run([*command, str(self.directory / "pgbouncer.ini")], check=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.admin("SHOW VERSION")
                return
            except psycopg2.Error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start on port {self.port}:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """Immediate shutdown (SIGTERM): every client connection is closed, as in a crash or a
        restart by an operator."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer (pid {pid}) did not stop")
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def admin(self, command: str) -> list[tuple[object, ...]]:
        """A command on PgBouncer's admin console (SHOW POOLS, RECONNECT, ...)."""
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, dbname="pgbouncer", user=self.user, connect_timeout=3)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(command)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def routed(self, dsn: str) -> str:
        """`dsn`'s database, through this PgBouncer."""
        return self.url(psycopg2.extensions.parse_dsn(dsn).get("dbname") or "postgres")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running(upstream: str, port: int, **kwargs: Any) -> Iterator[PgBouncer]:
    """A PgBouncer of its own (a fresh directory) for the life of the block."""
    directory = Path(tempfile.mkdtemp(prefix="mb-pgbouncer-"))
    bouncer = PgBouncer(upstream, directory, port, **kwargs)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(directory, ignore_errors=True)


# -- make pgbouncer-up / pgbouncer-down ----------------------------------------------------------


def _state_file(directory: Path) -> Path:
    return directory / "state.json"


def _is_this_bouncer(dsn: str, port: int) -> bool:
    """Whether `dsn` is the address of the PgBouncer `up` runs on `port` (it listens on 127.0.0.1)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    return params.get("host") in ("127.0.0.1", "localhost") and params.get("port") == str(port)


def up(directory: Path, port: int) -> int:
    """PgBouncer in front of the database `make run` uses: DATABASE_URL, else the embedded server
    (started, and left running, under EMBEDDED_DATA_DIR). A DATABASE_URL that is this PgBouncer's own
    address (the line a previous `up` printed, exported as the README says) means the database it
    stands in front of, which its state file names."""
    direct = os.environ.get("DATABASE_URL")
    embedded_dir = None
    if direct and _is_this_bouncer(direct, port):
        try:
            state = json.loads(_state_file(directory).read_text())
        except (OSError, ValueError):
            state = {}
        if not state or _is_this_bouncer(state["upstream"], port):
            print(
                f"DATABASE_URL={direct} is this PgBouncer's own address, not a database's: set it to the "
                "database (or unset it, for the embedded server) and run make pgbouncer-up again",
                file=sys.stderr,
            )
            return 1
        direct, embedded_dir = state["upstream"], state.get("embedded_dir")
    if not direct or embedded_dir:
        from message_broker.config import Settings
        from message_broker.db.embedded import DATABASE, embedded_server

        embedded_dir = embedded_dir or str(Path(Settings.from_env().embedded_data_dir).resolve())
        # Left running when this exits (`make pgbouncer-down` stops it): PgBouncer stands in front of it.
        server = embedded_server(embedded_dir, cleanup_mode=None)
        direct = server.get_uri(DATABASE)
    bouncer = PgBouncer(direct, directory, port)
    if bouncer.pid() is not None:
        print(f"pgbouncer already runs (pid {bouncer.pid()}, {directory})")
    else:
        bouncer.start()
        print(f"pgbouncer {port} in transaction pooling in front of {direct} (files in {directory})")
    _state_file(directory).write_text(json.dumps({"upstream": direct, "port": port, "embedded_dir": embedded_dir}))
    print(f"DATABASE_URL={bouncer.routed(direct)}")
    print(f"LISTEN_DATABASE_URL={direct}")
    return 0


def down(directory: Path) -> int:
    try:
        state = json.loads(_state_file(directory).read_text())
    except (OSError, ValueError):
        print(f"no pgbouncer state in {directory}: nothing to stop")
        return 0
    PgBouncer(state["upstream"], directory, state["port"]).stop()
    if state.get("embedded_dir"):
        from message_broker.db.embedded import embedded_server

        # Stops the embedded server unless another process (a `make run`) still uses it.
        embedded_server(state["embedded_dir"]).cleanup()
    shutil.rmtree(directory, ignore_errors=True)
    print("pgbouncer stopped")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.pgbouncer.bouncer up|down", file=sys.stderr)
        return 2
    if argv[0] == "up":
        if not installed():
            print(f"{BINARY} is missing: make pgbouncer-up installs it", file=sys.stderr)
            return 1
        return up(DEFAULT_DIR, DEFAULT_PORT)
    return down(DEFAULT_DIR)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
