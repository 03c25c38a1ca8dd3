"""The operator console's routes: the pages and assets come from the package with a strict
Content-Security-Policy, stay open when the API token protects reads, and reference nothing
outside the server."""

from __future__ import annotations

import re

from aiohttp.test_utils import TestClient

from message_broker.http.console import load_assets

from ..conftest import MakeClient

TOKEN = "console-test-token-0123456789abcdef"


PAGES = {
    "/console": "index.html",
    "/console/": "index.html",
    "/console/user/5": "user.html",
    "/console/webhooks": "webhooks.html",
}


async def test_pages_and_assets_come_from_the_package_with_a_strict_policy(client: TestClient) -> None:
    assets = load_assets()
    for path, name in {**PAGES, "/console/user/5/": "user.html", "/console/user/abc": "user.html"}.items():
        response = await client.get(path)
        assert response.status == 200, path
        assert response.content_type == "text/html"
        assert await response.read() == assets[name].body
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["X-Content-Type-Options"] == "nosniff"

    referenced: set[str] = set()
    for name in ("index.html", "user.html", "webhooks.html"):
        page = assets[name].body.decode()
        # Nothing inline for the policy to refuse: no inline script, style or event handler.
        assert "<script>" not in page and "<style" not in page and " style=" not in page
        assert not re.search(r"\son\w+=", page), name
        urls = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert not [u for u in urls if u.startswith(("http:", "https:", "//"))], name  # no CDN
        referenced |= {u for u in urls if u.startswith("/console/assets/")}
    for name, asset in assets.items():
        if name.endswith(".js"):  # modules import each other relatively
            referenced |= {"/console/assets/" + m for m in re.findall(r'from "\./([\w.-]+)"', asset.body.decode())}
    assert referenced == {f"/console/assets/{name}" for name in assets if not name.endswith(".html")}
    for url in sorted(referenced):
        response = await client.get(url)
        assert response.status == 200, url
        expected = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}[url.rpartition(".")[2]]
        assert response.content_type == expected, url
        again = await client.get(url, headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304


async def test_unknown_assets_are_404_in_the_error_shape(client: TestClient) -> None:
    for path in ("/console/assets/nope.js", "/console/assets/..%2Fconsole.py", "/console/other"):
        response = await client.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"]["code"] == "not_found"


async def test_console_pages_stay_open_when_the_token_protects_reads(make_client: MakeClient) -> None:
    client = await make_client(api_token=TOKEN, api_token_protect_reads=True)
    for path in (*PAGES, "/console/assets/api.js"):
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/api/v1/stats")).status == 401
    authorised = await client.get("/api/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorised.status == 200
    # Only reading is open: anything else on those paths still needs the token.
    assert (await client.post("/console/", data=b"")).status == 401
