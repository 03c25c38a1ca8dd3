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
