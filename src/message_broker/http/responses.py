"""Every JSON answer is encoded here: one encoder, built once (json.dumps with any option builds
a new encoder per call), UTF-8 as is (no \\u escapes)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

_ENCODER = json.JSONEncoder(ensure_ascii=False)

encode_json = _ENCODER.encode


# For an answer that echoes an unpaired surrogate a client sent (an unknown key, a refused value):
# UTF-8 cannot encode it, a \u escape can.
_ASCII_ENCODER = json.JSONEncoder(ensure_ascii=True)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    text = _ENCODER.encode(data)
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        body = _ASCII_ENCODER.encode(data).encode("ascii")
    return web.Response(body=body, status=status, content_type="application/json", charset="utf-8", headers=headers)


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
