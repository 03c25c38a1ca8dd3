"""The README's API examples run as written: its ```sh blocks (the rule is in tests/readme_examples.py
and in the README above its marker) run in order, in one bash session, against a fresh server process
on a fresh database, and every answer is compared with the comment under its command."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import psycopg2.extensions
import pytest

from .. import readme_examples as rx
from ..faults.harness import PASS, FaultProxy
from ..helpers import call
from ..pg import free_port
from ..servers import ServerProcess

README = Path(__file__).resolve().parents[2] / "README.md"

# `curl` as the examples call it, recording each request's status, headers and body; the README's
# localhost:3333 becomes the test server's address.
_PRELUDE = r"""
set -euo pipefail
__calls=0
curl() {
  __calls=$((__calls + 1))
  local args=() arg
  for arg in "$@"; do args+=("${arg//localhost:3333/$README_SERVER}"); done
  command curl "${args[@]}" -D "$README_LOG/$__calls.headers" -o "$README_LOG/$__calls.body" \
      -w '%{http_code}' > "$README_LOG/$__calls.status"
  cat "$README_LOG/$__calls.body"; echo
}
"""


def _body(raw: bytes) -> bytes:
    while raw.startswith(b"HTTP/"):  # curl -i writes the headers into the output too
        raw = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
    return raw


def _headers(raw: str) -> dict[str, str]:
    block = raw.strip().split("\r\n\r\n")[-1]
    pairs = (line.split(":", 1) for line in block.splitlines()[1:] if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def test_the_rule_finds_the_api_examples() -> None:
    blocks = rx.api_blocks(README.read_text())
    commands = [c for line, text in blocks for c in rx.commands(text, line)]
    assert len(blocks) >= 8 and sum(c.calls_curl for c in commands) >= 20
    assert sum(c.expected is not None for c in commands) >= 15


@pytest.mark.skipif(shutil.which("curl") is None, reason="the examples use curl")
async def test_readme_api_examples_answer_as_shown(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await _examples_answer_as_shown(await start_server(LOG_LEVEL="WARNING"), tmp_path)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the examples use curl")
async def test_readme_api_examples_answer_as_shown_with_a_slow_database(  # type: ignore[no-untyped-def]
    start_server, database_url: str, tmp_path: Path
) -> None:
    """The same, with every chunk between the service and PostgreSQL (its pool and its LISTEN
    connection) 20 ms late each way: a database 40 ms away. Each example is still answered as
    shown, the first time: nothing a client does next may depend on a background reload or a
    notification having come in first (a token used at once after its create, a ?wait answered
    by the process that applied its task)."""
    params = psycopg2.extensions.parse_dsn(database_url)
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    proxy = FaultProxy(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}")
    proxy.latency = 0.02
    await proxy.start()
    try:
        slow = psycopg2.extensions.make_dsn(database_url, host="127.0.0.1", port=proxy.port)
        server = await start_server(LOG_LEVEL="WARNING", DATABASE_URL=slow, LISTEN_DATABASE_URL=slow)
        await _examples_answer_as_shown(server, tmp_path)
        assert proxy.connections[PASS] >= 2  # the pool's and the LISTEN connection, at least
    finally:
        await proxy.close()


async def _examples_answer_as_shown(server: ServerProcess, tmp_path: Path) -> None:
    blocks = rx.api_blocks(README.read_text())
    commands = [c for line, text in blocks for c in rx.commands(text, line)]
    log = tmp_path / "calls"
    log.mkdir()
    script = _PRELUDE + "\n".join(text for _, text in blocks) + "\n"
    env = {
        **os.environ,
        "README_SERVER": server.url.removeprefix("http://"),
        "README_LOG": str(log),
        # For examples that use the command line (message-broker ...) on the server's database.
        "DATABASE_URL": server.database_url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    bash = await asyncio.create_subprocess_exec(
        "bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(bash.communicate(), timeout=300)
    assert bash.returncode == 0, f"the examples stopped: {stderr.decode()[-2000:]}"

    curls = [c for c in commands if c.calls_curl]
    assert len(list(log.glob("*.status"))) == len(curls), "each curl command makes exactly one request"
    problems: list[str] = []
    for n, command in enumerate(curls, 1):
        status = int((log / f"{n}.status").read_text())
        raw_body = _body((log / f"{n}.body").read_bytes())
        headers = _headers((log / f"{n}.headers").read_text())
        where = f"README line {command.line}: {command.text.splitlines()[0].strip()}"
        expected = command.expected
        if expected is None:
            if not 200 <= status < 300:
                problems.append(f"{where}\n  answered {status}: {raw_body[:300]!r}")
            continue
        found: list[str] = []
        if status != expected.status:
            found.append(f"status {status}, README shows {expected.status}")
        body = json.loads(raw_body) if (raw_body.strip() and expected.body is not None) or expected.error_code else None
        if expected.body is not None:
            found += rx.mismatches(expected.body, body)
        if expected.error_code is not None:
            code = body.get("error", {}).get("code") if isinstance(body, dict) else None
            if code != expected.error_code:
                found.append(f"error code {code!r}, README shows {expected.error_code!r}")
        for name, value in expected.headers.items():
            if headers.get(name.lower()) != value:
                found.append(f"header {name}: {headers.get(name.lower())!r}, README shows {value!r}")
        if found:
            problems.append(f"{where}\n  " + "\n  ".join(found))
    assert not problems, "\n".join(problems)


def _receiver_example() -> str:
    """The README's webhook receiver, the ```python block after "**A receiver**"."""
    text = README.read_text(encoding="utf-8")
    start = text.index("```python", text.index("**A receiver**")) + len("```python")
    return text[start : text.index("```", start)]


async def test_the_readme_webhook_receiver_runs_and_verifies_a_delivery(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The README's receiver, with its port and the endpoint's secret filled in, receives and
    verifies a real delivery. It ended at once with a TypeError: aiohttp's Application takes no
    `routes` argument."""
    server = await start_server(WEBHOOK_ALLOW_PRIVATE="true")
    port = free_port()
    status, endpoint = await call(
        "POST", server.url + "/api/v1/webhooks/", {"url": f"http://127.0.0.1:{port}/hook", "events": ["task.done"]}
    )
    assert status == 201, endpoint
    example = _receiver_example()
    assert "port=9000" in example and 'Webhook("whsec_...")' in example
    script = tmp_path / "receiver.py"
    script.write_text(
        example.replace("port=9000", f"port={port}").replace("whsec_...", endpoint["secret"]), encoding="utf-8"
    )
    receiver = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert receiver.stdout is not None
        banner = await asyncio.wait_for(receiver.stdout.readline(), 30)
        assert b"Running on" in banner, banner + await receiver.stdout.read()
        status, user = await call("POST", server.url + "/api/v1/user/", {"username": "hooked", "balance": 5})
        status, task = await call(
            "POST", server.url + f"/api/v1/user/{user['id']}/amount/?wait=10", {"type": "replenishment", "amount": 7}
        )
        assert (status, task["status"]) == (200, "done"), task
        line = b""
        while not line.startswith(b"task.done"):
            line = await asyncio.wait_for(receiver.stdout.readline(), 30)
            assert line, "the receiver ended"
        assert line.split() == [b"task.done", task["id"].encode(), user["id"].encode(), b"12"]
    finally:
        receiver.kill()
        await receiver.wait()
