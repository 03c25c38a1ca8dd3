"""The webhook sender's pure parts: the retry schedule, signatures as the Standard Webhooks
reference library reads them, which addresses are refused, Retry-After, URL shapes."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime

import aiohttp
import pytest
from standardwebhooks import Webhook

from message_broker.config import ConfigError, Settings, webhook_retry_delays
from message_broker.db.webhooks import Claimed
from message_broker.ledger import Status, TaskType
from message_broker.models import Task
from message_broker.worker.tasks import BackgroundTasks
from message_broker.worker.webhooks import (
    MAX_RETRY_AFTER,
    InvalidUrl,
    SenderSettings,
    WebhookSender,
    _Queued,
    address_refused,
    changed_endpoint,
    check_url,
    parse_url,
    retry_after_seconds,
    secret_text,
    sign,
)


def test_the_default_schedule_is_svix_s() -> None:
    assert webhook_retry_delays(Settings().webhook_retry_schedule) == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert webhook_retry_delays("0.5s, 1d") == (0.5, 86400)
    assert webhook_retry_delays("") == ()


@pytest.mark.parametrize("schedule", ["5", "5x", "s", "-1s", "nans", "infh", "5s,,x"])
def test_a_bad_schedule_is_refused(schedule: str) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({"WEBHOOK_RETRY_SCHEDULE": schedule})


@pytest.mark.parametrize("env", [{"WEBHOOK_TIMEOUT": "0"}, {"WEBHOOK_CONCURRENCY": "0"}, {"WEBHOOK_RETENTION": "-1"}])
def test_bad_webhook_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_signatures_verify_with_the_reference_library_one_key_or_two() -> None:
    new, old = b"n" * 32, b"o" * 32
    body = json.dumps({"type": "task.done", "data": {"id": "1", "note": "é"}}, ensure_ascii=False).encode()
    now = int(datetime.now(UTC).timestamp())
    headers = {
        "webhook-id": "msg_1_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign([new], "msg_1_1", now, body),
    }
    assert Webhook(secret_text(new)).verify(body, headers)["data"]["note"] == "é"
    both = {**headers, "webhook-signature": sign([new, old], "msg_1_1", now, body)}
    assert both["webhook-signature"].count("v1,") == 2 and " " in both["webhook-signature"]
    for secret in (new, old):
        Webhook(secret_text(secret)).verify(body, both)
    with pytest.raises(Exception, match="signature"):
        Webhook(secret_text(b"x" * 32)).verify(body, both)
    assert base64.b64decode(secret_text(new).removeprefix("whsec_")) == new


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "fe80::1%eth0",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "0.0.0.0",
        "::",
        "::ffff:10.0.0.1",
        "100.64.0.1",
        "fc00::1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "2002:c0a8:101::",  # 6to4 of 192.168.1.1
        "fec0::1",  # site-local
        "3fff::1",  # documentation (RFC 9637)
        "192.0.0.8",  # IPv4 dummy address (RFC 7600): IETF protocol assignments, 192.0.0.0/24
        "192.0.0.200",
        "::ffff:192.0.0.8",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refused(address) is not None


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "2002:808:808::", "example.com", "192.0.0.9", "192.0.0.10"],
)
def test_public_addresses_and_names_pass(address: str) -> None:
    assert address_refused(address) is None


def test_retry_after() -> None:
    assert retry_after_seconds("120", 0) == 120
    assert retry_after_seconds("99999", 0) == MAX_RETRY_AFTER
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10
    assert retry_after_seconds("soon", 0) is None and retry_after_seconds(None, 0) is None
    # Digits of other scripts are not delta-seconds (RFC 9110: DIGIT is ASCII): unreadable, ignored,
    # never an exception in the sender ("²" is str.isdigit() but not a number float() reads).
    for header in ("\u00b2", "\u0661\u0662", "\uff15"):
        assert retry_after_seconds(header, 0) is None, header


@pytest.mark.parametrize(
    "url",
    [
        "ftp://a.example/",
        "https://u:p@a.example/",
        "https://a.example:0/",
        "http://",
        "https://a.example/ x",
        "https://xn--zz.example/",
        "http://a@b[]c@",
        "http://a..b/x",
        "http://" + "a" * 64 + ".example/x",
        "http://" + "a." * 127 + "example/x",
        "http://[v1.fe]/x",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(InvalidUrl):
        parse_url(url)


@pytest.mark.parametrize(
    "url", ["http://16843009/", "http://001.001.001.001/", "http://127.1:9/", "http://127.0.0.1.:9/", "http://0:9/"]
)
async def test_an_ipv4_address_the_sender_cannot_connect_to_is_refused_even_with_private_allowed(url: str) -> None:
    # aiohttp refuses these forms at every attempt (InvalidUrlClientError): registering one would
    # make an endpoint whose every delivery fails.
    with pytest.raises(InvalidUrl):
        await check_url(url, allow_private=True)


async def test_a_dotted_quad_and_a_name_pass_with_private_allowed() -> None:
    for url in ("http://127.0.0.1:9/", "http://localhost:9/", "http://[::1]:9/", "http://0x7f.1:9/"):
        await check_url(url, allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://a.example./x",
        "https://xn--bcher-kva.example/",
        "http://" + "a" * 63 + ".example/",
        "http://[::1]:9/",
        "http://my_host:9/",
    ],
)
def test_well_formed_hosts_pass(url: str) -> None:
    parse_url(url)


def test_a_url_keeps_its_port_and_path() -> None:
    url = parse_url("https://a.example:8443/hooks?x=1")
    assert (url.host, url.port, url.path_qs) == ("a.example", 8443, "/hooks?x=1")


def _sender_and_claim() -> tuple[WebhookSender, Claimed]:
    settings = SenderSettings(
        timeout=1.0, retry_delays=(1.0,), disable_after=60.0, concurrency=1, allow_private=True, max_wait=30.0
    )
    sender = WebhookSender(None, BackgroundTasks(), settings, dump_task=lambda task: {}, encode_json=json.dumps)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    task = Task(1, 1, TaskType.REPLENISHMENT, 5, Status.DONE, None, 5, 5, None, None, None, None, now, now)
    # Port 9 (discard): an attempt, if one were made, would fail at once and not hang.
    return sender, Claimed(1, 1, "task.finished", 1, 1, "http://127.0.0.1:9/hook", (b"k" * 24,), task)


async def test_an_attempt_that_waited_for_its_slot_past_its_start_by_is_not_made() -> None:
    """Every request takes one of WEBHOOK_CONCURRENCY slots. A delivery whose slot came free only
    after the last moment its lease still had room for an attempt (it waited behind other
    endpoints' slow answers) is not attempted: its lane gives it back. The check used to come
    before the wait for the slot, so such an attempt could outlive its lease and be sent twice."""
    sender, claimed = _sender_and_claim()
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        async with sender._slots:  # the only slot: another endpoint's attempt, answered slowly
            waiting = _Queued(claimed, loop.time() + 0.05, 0)
            delivering = asyncio.create_task(sender._deliver(session, waiting))
            await asyncio.sleep(0.1)  # the slow answer outlasts the delivery's start-by
            assert not delivering.done()
        assert await delivering is False


async def test_a_delivery_claimed_before_its_endpoint_changed_is_not_attempted() -> None:
    """A claim under way when the endpoint changed read it as it was (old URL, old keys, still
    enabled): what it claimed goes back instead of being sent."""
    sender, claimed = _sender_and_claim()
    waiting = _Queued(claimed, asyncio.get_running_loop().time() + 60, 0)  # claimed with 0 changes heard
    sender.endpoint_changed(claimed.endpoint_id)
    async with aiohttp.ClientSession() as session:
        assert await sender._deliver(session, waiting) is False


@pytest.mark.parametrize(
    ("payload", "endpoint_id"), [("", None), ("endpoint 42", 42), ("endpoint x", None), ("endpoint ²", None)]
)
def test_a_delivery_notification_names_a_changed_endpoint_or_none(payload: str, endpoint_id: int | None) -> None:
    assert changed_endpoint(payload) == endpoint_id
