"""Receipts that never came, recovered by asking the provider.

Messages go to the real sandbox on loopback with no StatusCallback (as if every receipt had been
lost), matching ``submitted`` rows go into a small real store, and :func:`reconcile_receipts`
must find their final status at the provider. SMS.ru's status call and a provider that answers
503 are small Starlette fakes served the same way.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from smsops import store
from smsops.providers import (
    AuthenticationError,
    ConfigError,
    Provider,
    ProviderUnavailable,
    SendRequest,
    from_config,
)
from smsops.providers.sandbox import SandboxServer, SandboxSettings, run_in_thread, serve_in_thread
from smsops.providers.smsru import SmsRuProvider
from smsops.providers.twilio import TwilioProvider
from smsops.receipts import (
    DEFAULT_WAIT,
    HORIZON,
    ReceiptReport,
    next_lookup_in,
    receipt_wait,
    reconcile_receipts,
)

SENDER = "SHOPMARKET"
CALM = dict(
    latency=(0.0, 0.0),
    transient_error_rate=0.0,
    duplicate_rate=0.0,
    out_of_order_rate=0.0,
    rate_per_second=100_000,
)
NO_WAIT = timedelta(0)
ACCOUNT = "AC" + "7e" * 16
TOKEN = "receipts-test-token-never-print-3b9f"
SMSRU_API_ID = "SMSRU-API-ID-SECRET-51c0-do-not-leak"


# ---------------------------------------------------------------------------------------
# The sandbox, a store, and messages whose receipts were lost


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    """Receipts would come within 50 ms, had anyone asked for them."""
    with run_in_thread(SandboxSettings(**CALM, receipt_delay=(0.0, 0.05))) as server:
        yield server


@pytest.fixture(scope="module")
def slow_sandbox() -> Iterator[SandboxServer]:
    """Messages stay ``queued`` for ten minutes: never final while a test runs."""
    with run_in_thread(SandboxSettings(**CALM, receipt_delay=(600.0, 600.0))) as server:
        yield server


def sandbox_provider(server: SandboxServer) -> Provider:
    return from_config("sandbox", {"SANDBOX_URL": server.url})


def send_without_callback(provider: Provider, numbers: list[str]) -> list[str]:
    """Send one message to each number with no StatusCallback; the provider's ids."""

    async def go() -> list[str]:
        async with httpx.AsyncClient() as client:
            results = [
                await provider.send(client, SendRequest(i, to, SENDER, f"Скидка 20% для {to[-4:]}"))
                for i, to in enumerate(numbers)
            ]
        assert [r.outcome for r in results] == ["accepted"] * len(numbers), results
        return [r.provider_message_id for r in results]

    return asyncio.run(go())


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def submitted(home: Path, provider: str, rows: list[tuple[str, str, datetime]]) -> list[int]:
    """``submitted`` outbox rows of a running campaign, one per (phone, provider id, submitted at),
    as the dispatcher leaves them after the provider accepted each message."""
    now = stamp(datetime.now(UTC))
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at, launched_at)"
                " values ('Осенняя распродажа', 'promo', 'running', ?, ?, ?) returning campaign_id",
                (SENDER, now, now),
            ).fetchone()
            ids = []
            for contact_id, (phone, sid, at) in enumerate(rows, start=1):
                (mid,) = conn.execute(
                    "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164,"
                    " body, state, provider, provider_message_id, planned_at, submitted_at, attempts)"
                    " values (?, ?, 'A', ?, ?, 'Скидка 20%', 'submitted', ?, ?, ?, ?, 1) returning message_id",
                    (f"{cid}:{contact_id}", cid, contact_id, phone, provider, sid, stamp(at), stamp(at)),
                ).fetchone()
                ids.append(mid)
    finally:
        conn.close()
    return ids


def statuses(home: Path) -> set[tuple[int, str, str | None]]:
    conn = store.open_store(home)
    try:
        return set(conn.execute("select message_id, status, error_code from message_status_events"))
    finally:
        conn.close()


def lookups(home: Path) -> dict[int, tuple[int, str | None, int]]:
    """message_id → (lookups answered, last status found, errors since)."""
    conn = store.open_store(home)
    try:
        rows = conn.execute("select message_id, lookups, last_status, errors from receipt_lookups")
        return {mid: (n, status, errors) for mid, n, status, errors in rows}
    finally:
        conn.close()


def reconcile(home: Path, provider: Provider, **options) -> ReceiptReport:
    async def go() -> ReceiptReport:
        async with httpx.AsyncClient(timeout=5.0) as client:
            return await reconcile_receipts(home, provider, client, **options)

    return asyncio.run(go())


def settled(provider: Provider, sids: list[str], timeout: float = 5.0) -> None:
    """Wait until the sandbox holds a final status for every message (its receipts are quick)."""

    async def final() -> bool:
        async with httpx.AsyncClient() as client:
            found = [await provider.lookup(client, sid) for sid in sids]
        return all(f is not None and f.status in ("delivered", "undelivered", "failed") for f in found)

    deadline = time.monotonic() + timeout
    while not asyncio.run(final()):
        assert time.monotonic() < deadline, "the sandbox never settled its messages"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------
# How long to wait, and how long to back off


def test_receipt_wait_has_a_default_per_provider_and_two_overrides():
    assert receipt_wait("sandbox", {}) == timedelta(minutes=2) == DEFAULT_WAIT["sandbox"]
    assert receipt_wait("twilio", {}) == receipt_wait("smsru", {}) == timedelta(minutes=15)
    everyone = {"SMSOPS_RECEIPT_LOOKUP_MINUTES": "5"}
    assert receipt_wait("sandbox", everyone) == receipt_wait("twilio", everyone) == timedelta(minutes=5)
    one = {**everyone, "SMSOPS_TWILIO_RECEIPT_LOOKUP_MINUTES": "0.5"}
    assert receipt_wait("twilio", one) == timedelta(seconds=30)
    assert receipt_wait("smsru", one) == timedelta(minutes=5)
    assert receipt_wait("sandbox", {"SMSOPS_SANDBOX_RECEIPT_LOOKUP_MINUTES": "0"}) == NO_WAIT


@pytest.mark.parametrize("value", ["ten", "-1", "nan", "inf", "4320"])
def test_a_bad_receipt_wait_names_its_variable(value):
    with pytest.raises(ConfigError, match=f"SMSOPS_SMSRU_RECEIPT_LOOKUP_MINUTES={value!r}"):
        receipt_wait("smsru", {"SMSOPS_SMSRU_RECEIPT_LOOKUP_MINUTES": value})
    with pytest.raises(ConfigError, match="SMSOPS_RECEIPT_LOOKUP_MINUTES="):
        receipt_wait("twilio", {"SMSOPS_RECEIPT_LOOKUP_MINUTES": value})


def test_the_back_off_starts_at_the_wait_doubles_and_is_capped():
    wait = timedelta(minutes=15)
    assert [next_lookup_in(wait, n) for n in (1, 2, 3)] == [wait, 2 * wait, 4 * wait]
    assert next_lookup_in(wait, 40) == timedelta(hours=12)
    assert next_lookup_in(NO_WAIT, 1) == timedelta(minutes=1)  # never a busy loop


# ---------------------------------------------------------------------------------------
# Recovering lost receipts from the sandbox


def test_lost_receipts_are_recovered_with_their_error_codes(home, sandbox):
    provider = sandbox_provider(sandbox)
    numbers = ["+79161234501", "+79161234599"]  # …99: undelivered, 30003
    sids = send_without_callback(provider, numbers)
    settled(provider, sids)
    sent_at = datetime.now(UTC) - timedelta(minutes=1)
    delivered, unreachable = submitted(
        home, "sandbox", [(n, s, sent_at) for n, s in zip(numbers, sids, strict=True)]
    )

    report = reconcile(home, provider, wait=NO_WAIT)

    assert report == ReceiptReport(looked_up=2, recovered=2)
    assert statuses(home) == {(delivered, "delivered", None), (unreachable, "undelivered", "30003")}
    assert lookups(home) == {delivered: (1, "delivered", 0), unreachable: (1, "undelivered", 0)}
    assert reconcile(home, provider, wait=NO_WAIT) == ReceiptReport()  # settled: never asked again


def test_a_message_without_a_final_status_is_asked_again_only_after_the_back_off(home, slow_sandbox):
    provider = sandbox_provider(slow_sandbox)
    (sid,) = send_without_callback(provider, ["+79161234502"])
    now = datetime.now(UTC)
    (mid,) = submitted(home, "sandbox", [("+79161234502", sid, now - timedelta(minutes=1))])

    first = reconcile(home, provider, wait=NO_WAIT, now=now)
    assert first == ReceiptReport(looked_up=1, still_pending=1)
    assert statuses(home) == {(mid, "queued", None)}  # what the provider had is recorded too

    back_off = next_lookup_in(NO_WAIT, 1)
    assert reconcile(home, provider, wait=NO_WAIT, now=now).looked_up == 0
    assert reconcile(home, provider, wait=NO_WAIT, now=now + back_off / 2).looked_up == 0
    later = now + back_off + timedelta(seconds=1)
    assert reconcile(home, provider, wait=NO_WAIT, now=later).still_pending == 1
    assert lookups(home)[mid] == (2, "queued", 0)
    # the second back-off is twice the first
    assert reconcile(home, provider, wait=NO_WAIT, now=later + back_off * 1.5).looked_up == 0
    assert reconcile(home, provider, wait=NO_WAIT, now=later + back_off * 2.5).looked_up == 1


def test_only_messages_past_their_wait_and_within_the_horizon_are_looked_up(home, sandbox):
    provider = sandbox_provider(sandbox)
    numbers = ["+79161234503", "+79161234504", "+79161234505", "+79161234506"]
    sids = send_without_callback(provider, numbers)
    settled(provider, sids)
    now = datetime.now(UTC)
    recent, forgotten, orphaned, unknown, long_gone = submitted(
        home,
        "sandbox",
        [
            (numbers[0], sids[0], now - timedelta(minutes=1)),  # the sandbox's wait is 2 minutes
            (numbers[1], sids[1], now - HORIZON - timedelta(minutes=1)),
            (numbers[2], sids[2], now - timedelta(minutes=10)),
            (numbers[3], "SM" + "f" * 32, now - timedelta(minutes=10)),
            ("+79161234508", "SM" + "e" * 32, now - 2 * HORIZON - timedelta(minutes=1)),  # counted before
        ],
    )
    conn = store.open_store(home)
    try:  # its receipt came before the dispatcher recorded the id: it waits as an orphan
        conn.execute(
            "insert into orphan_status_events (provider, provider_message_id, status, occurred_at,"
            " received_at) values ('sandbox', ?, 'delivered', ?, ?)",
            (sids[2], stamp(now), stamp(now)),
        )
    finally:
        conn.close()
    wait = receipt_wait("sandbox", {})

    report = reconcile(home, provider, wait=wait, now=now)
    assert report == ReceiptReport(looked_up=1, not_found=1, past_horizon=1)  # only the unknown sid
    assert set(lookups(home)) == {unknown}
    assert statuses(home) == set()

    report = reconcile(home, provider, wait=wait, now=now + timedelta(minutes=1, seconds=1))
    assert report == ReceiptReport(looked_up=1, recovered=1, past_horizon=1)
    assert statuses(home) == {(recent, "delivered", None)}
    assert not {forgotten, orphaned, long_gone} & set(lookups(home))


def test_a_message_the_provider_does_not_know_is_not_found_and_backed_off(home, sandbox):
    provider = sandbox_provider(sandbox)
    now = datetime.now(UTC)
    (mid,) = submitted(home, "sandbox", [("+79161234507", "SM" + "0" * 32, now - timedelta(minutes=5))])

    assert reconcile(home, provider, wait=NO_WAIT, now=now) == ReceiptReport(looked_up=1, not_found=1)
    assert lookups(home) == {mid: (1, "not_found", 0)}
    assert reconcile(home, provider, wait=NO_WAIT, now=now).looked_up == 0
    assert statuses(home) == set()


def test_refused_credentials_stop_the_pass_and_never_quote_the_token(home, sandbox):
    provider = TwilioProvider(account_sid=ACCOUNT, auth_token=TOKEN, base_url=sandbox.url, name="sandbox")
    sent_at = datetime.now(UTC) - timedelta(minutes=5)
    submitted(home, "sandbox", [(f"+7916123451{i}", f"SM{i:032x}", sent_at) for i in range(5)])

    report = reconcile(home, provider, wait=NO_WAIT, concurrency=1)

    assert (report.stopped, report.looked_up, report.errors) == ("credentials", 0, 0)
    assert "credentials" in report.error and TOKEN not in report.error
    assert lookups(home) == {}  # nothing put off: all are asked again once the token is fixed


# ---------------------------------------------------------------------------------------
# A provider that cannot answer


def flaky_twilio(down: set[str], in_flight: list[int] | None = None) -> Starlette:
    """Twilio's message resource: 503 for the sids in ``down``, else ``delivered``. With
    ``in_flight`` ([now, most]) each answer takes 50 ms and the requests in flight are counted."""

    async def fetch(request: Request) -> Response:
        sid = request.path_params["sid"]
        if in_flight is not None:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            await asyncio.sleep(0.05)
            in_flight[0] -= 1
        if sid in down:
            return JSONResponse({"code": 20503, "message": "Service Unavailable", "status": 503}, 503)
        now = format_datetime(datetime.now(UTC))
        body = {"sid": sid, "status": "delivered", "error_code": None, "date_updated": now}
        return JSONResponse(body)

    return Starlette(routes=[Route("/2010-04-01/Accounts/{account}/Messages/{sid}.json", fetch)])


def test_a_provider_answering_503_counts_an_error_and_is_asked_again_next_pass(home):
    down = {"SM" + "a" * 32, "SM" + "b" * 32}
    with serve_in_thread(flaky_twilio(down)) as server:
        provider = TwilioProvider(account_sid=ACCOUNT, auth_token=TOKEN, base_url=server.url)
        now = datetime.now(UTC)
        older, newer = submitted(
            home,
            "twilio",
            [
                ("+79161234521", "SM" + "a" * 32, now - timedelta(hours=2)),
                ("+79161234522", "SM" + "b" * 32, now - timedelta(hours=1)),
            ],
        )

        first = reconcile(home, provider, wait=NO_WAIT, now=now, limit=1)
        assert first == ReceiptReport(looked_up=1, errors=1)
        assert lookups(home) == {older: (0, None, 1)}

        # Those that failed come after those that did not: one that always fails holds up no one.
        down.discard("SM" + "b" * 32)
        second = reconcile(home, provider, wait=NO_WAIT, now=now, limit=1)
        assert second == ReceiptReport(looked_up=1, recovered=1)
        assert statuses(home) == {(newer, "delivered", None)}

        down.clear()  # the provider is back: the next pass asks again at once, no back-off
        third = reconcile(home, provider, wait=NO_WAIT, now=now)
        assert third == ReceiptReport(looked_up=1, recovered=1)
    assert statuses(home) == {(newer, "delivered", None), (older, "delivered", None)}
    assert lookups(home)[older] == (1, "delivered", 0)


def test_lookups_run_concurrently_but_never_more_than_asked(home):
    in_flight = [0, 0]
    with serve_in_thread(flaky_twilio(set(), in_flight)) as server:
        provider = TwilioProvider(account_sid=ACCOUNT, auth_token=TOKEN, base_url=server.url)
        sent_at = datetime.now(UTC) - timedelta(hours=1)
        submitted(home, "twilio", [(f"+791612346{i:02d}", f"SM{i:032x}", sent_at) for i in range(24)])
        report = reconcile(home, provider, wait=NO_WAIT, concurrency=4)
    assert report == ReceiptReport(looked_up=24, recovered=24)
    assert in_flight == [0, 4]


# ---------------------------------------------------------------------------------------
# SMS.ru's status call


def fake_smsru_status(codes: dict[str, int | str]) -> Starlette:
    """SMS.ru's ``POST /sms/status``: each sms_id's delivery code (103, 104 …), or what the whole
    answer should be: ``"503"`` an HTTP 503, ``"429"`` an HTTP 429, ``"220"`` SMS.ru's own
    "service unavailable"; an unknown id gets SMS.ru's -1 "not found"."""

    async def status(request: Request) -> Response:
        data = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        if data.get("api_id") != SMSRU_API_ID:
            return JSONResponse({"status": "ERROR", "status_code": 200, "status_text": "Неправильный api_id"})
        sms_id = data.get("sms_id", "")
        code = codes.get(sms_id)
        if code in ("503", "429"):
            return Response("busy", status_code=int(code))
        if code == "220":
            return JSONResponse({"status": "ERROR", "status_code": 220, "status_text": "Сервис недоступен"})
        entry = (
            {"status": "OK", "status_code": code, "cost": 3.95, "status_text": "..."}
            if code is not None
            else {"status": "ERROR", "status_code": -1, "status_text": "Сообщение не найдено"}
        )
        return JSONResponse({"status": "OK", "status_code": 100, "sms": {sms_id: entry}, "balance": 100.0})

    return Starlette(routes=[Route("/sms/status", status, methods=["POST"])])


SMSRU_CODES: dict[str, int | str] = {
    "000000-00000001": 103,
    "000000-00000002": 104,
    "000000-00000003": 102,
    "000000-00000004": "503",
    "000000-00000005": "429",
    "000000-00000006": "220",
}


@pytest.fixture(scope="module")
def smsru() -> Iterator[SmsRuProvider]:
    with serve_in_thread(fake_smsru_status(SMSRU_CODES)) as server:
        yield SmsRuProvider(api_id=SMSRU_API_ID, base_url=server.url)


def test_smsru_lookup_gives_the_status_and_its_code_or_says_why_not(smsru):
    async def look(provider: SmsRuProvider, sms_id: str):
        async with httpx.AsyncClient() as client:
            return await provider.lookup(client, sms_id)

    delivered = asyncio.run(look(smsru, "000000-00000001"))
    undelivered = asyncio.run(look(smsru, "000000-00000002"))
    sent = asyncio.run(look(smsru, "000000-00000003"))
    assert (delivered.provider, delivered.status, delivered.error_code) == ("smsru", "delivered", None)
    assert (undelivered.status, undelivered.error_code) == ("undelivered", "104")
    assert (sent.status, sent.error_code) == ("sent", None)
    assert asyncio.run(look(smsru, "000000-99999999")) is None
    for busy in ("000000-00000004", "000000-00000005", "000000-00000006"):
        with pytest.raises(ProviderUnavailable):
            asyncio.run(look(smsru, busy))
    wrong = SmsRuProvider(api_id="wrong-api-id-1f2e", base_url=smsru.base_url)
    with pytest.raises(AuthenticationError, match="SMSRU_API_ID") as refused:
        asyncio.run(look(wrong, "000000-00000001"))
    assert "wrong-api-id-1f2e" not in str(refused.value)


def test_smsru_receipts_are_recovered_through_its_status_call(home, smsru):
    sent_at = datetime.now(UTC) - timedelta(hours=1)
    ids = submitted(
        home, "smsru", [(f"+7916123453{i}", sms_id, sent_at) for i, sms_id in enumerate(SMSRU_CODES)]
    )

    report = reconcile(home, smsru, now=datetime.now(UTC))  # SMS.ru's own wait: 15 minutes

    assert report == ReceiptReport(looked_up=6, recovered=2, still_pending=1, errors=3)
    assert statuses(home) == {
        (ids[0], "delivered", None),
        (ids[1], "undelivered", "104"),
        (ids[2], "sent", None),
    }


# ---------------------------------------------------------------------------------------
# From a terminal


def test_receipts_reconcile_from_the_command_line(home, sandbox):
    provider = sandbox_provider(sandbox)
    sids = send_without_callback(provider, ["+79161234541", "+79161234599"])
    settled(provider, sids)
    sent_at = datetime.now(UTC) - timedelta(minutes=3)
    ids = submitted(home, "sandbox", [("+79161234541", sids[0], sent_at), ("+79161234599", sids[1], sent_at)])
    env = {**os.environ, "SMSOPS_HOME": str(home), "SANDBOX_URL": sandbox.url, "SMSOPS_PROVIDER": "sandbox"}

    def smsops(*args: str, **extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "smsops.cli", "receipts", "reconcile", *args]
        return subprocess.run(command, capture_output=True, text=True, env={**env, **extra})

    out = smsops("--limit", "10")
    assert out.returncode == 0, out.stderr
    assert "2 message(s) with an overdue receipt looked up" in out.stdout
    assert "recovered      2" in out.stdout
    assert statuses(home) == {(ids[0], "delivered", None), (ids[1], "undelivered", "30003")}

    bad = smsops(SMSOPS_SANDBOX_RECEIPT_LOOKUP_MINUTES="soon")
    assert bad.returncode == 2 and "SMSOPS_SANDBOX_RECEIPT_LOOKUP_MINUTES='soon'" in bad.stderr
