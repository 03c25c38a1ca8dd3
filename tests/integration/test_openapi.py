"""The contract: GET /api/v1/openapi.json covers every route, GET /api/v1/docs serves Swagger UI
from the installed package, and schemathesis, run against the real server with that document,
finds no server error and no response that differs from the document."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from aiohttp.test_utils import TestClient

SPEC = "/api/v1/openapi.json"


def _route_key(method: str, path: str) -> tuple[str, str]:
    return method.upper(), path.rstrip("/")


async def test_document_covers_every_route_with_its_error_shape(client: TestClient) -> None:
    response = await client.get(SPEC)
    assert response.status == 200
    spec = await response.json()
    assert spec["openapi"].startswith("3.")
    documented = {_route_key(method, path) for path, ops in spec["paths"].items() for method in ops}
    served = {
        _route_key(route.method, route.resource.canonical)
        for route in client.server.app.router.routes()
        if route.method not in ("HEAD", "*")
        and route.resource is not None
        and "/assets" not in route.resource.canonical
    }
    assert documented == served
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if int(status) >= 400 and not (path == "/ready" and status == "503"):
                    assert answer["content"]["application/json"]["schema"] == error_ref, (method, path, status)
            assert "405" in operation["responses"]
            assert "400" in operation["responses"]  # a query parameter the route does not know, on every route


async def test_docs_page_is_served_from_the_package(client: TestClient) -> None:
    response = await client.get("/api/v1/docs")
    assert response.status == 200 and response.content_type == "text/html"
    page = await response.text()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(asset.startswith("/api/v1/docs/assets/") for asset in assets)  # no CDN
    assert SPEC in page
    for asset in assets:
        asset_response = await client.get(asset)
        assert asset_response.status == 200, asset
        assert len(await asset_response.read()) > 1000


async def test_a_missing_docs_asset_is_a_json_404(client: TestClient) -> None:
    """aiohttp's static route answered it with an empty application/octet-stream 404 (found from
    outside)."""
    for path in ("/api/v1/docs/assets/missing.js", "/api/v1/docs/assets/", "/api/v1/docs/assets/..%2Fopenapi.py"):
        response = await client.get(path)
        assert (response.status, response.content_type) == (404, "application/json"), path
        assert (await response.json())["error"]["code"] == "not_found"


async def test_schemathesis_finds_no_server_error_and_no_mismatch(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = await start_server(LOG_LEVEL="WARNING")
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}{SPEC}",
        "--checks",
        ",".join(checks),
        # The event streams never end by themselves; test_events.py covers them.
        "--exclude-path-regex",
        "events$",
        "--max-examples",
        "10",
        # A fixed seed: the same cases every run, so a failure here is a real one to reproduce.
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "35",
        "--no-color",
        # Its warnings grade the generated data, not the API: most generated POSTs reuse an
        # Idempotency-Key (422, as they must) or name ids that do not exist (404).
        "--warnings",
        "off",
    ]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-6000:]
    assert "No issues found" in report, report[-6000:]
    # Every operation but the two streams is tested.
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    assert selected is not None and int(selected[1]) == int(selected[2]) - 2, report[-6000:]
    assert f"Tested: {selected[1]}" in report, report[-6000:]
