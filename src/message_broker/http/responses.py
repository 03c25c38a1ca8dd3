"""Every JSON answer is encoded here: one encoder, built once (json.dumps with any option builds
a new encoder per call), UTF-8 as is (no \\u escapes)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

_ENCODER = json.JSONEncoder(ensure_ascii=False)

encode_json = _ENCODER.encode


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=_ENCODER.encode(data), status=status, content_type="application/json", headers=headers)


def paged_response(request: web.Request, items: list[Any], limit: int, next_page: dict[str, Any]) -> web.Response:
    """A page of a list, with `Link: <...>; rel="next"` (RFC 8288) when it is full: the same query
    with the cursor moved past its last item. A short page is the last one."""
    headers = {}
    if len(items) >= limit and next_page:
        moved = {"limit": str(limit), **{name: str(value) for name, value in next_page.items()}}
        kept = [(name, value) for name, value in request.query.items() if name not in moved]
        url = request.rel_url.with_query([*kept, *moved.items()])
        headers["Link"] = f'<{url}>; rel="next"'
    return json_response(items, headers=headers)
