"""The dispatcher against the real sandbox on loopback and a real SQLite store.

Each test writes a small running campaign straight into the outbox (what ``campaigns.plan``
writes), so the dispatcher is tested without a warehouse build. Numbers decide the sandbox's
answer by their last two digits: ``…13`` STOP (21610), ``…00`` invalid (21211), others accepted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sandboxes import FAST
from zones import zone_where_it_is

from smsops import campaigns, cli, consent, dispatch, serve, store, unsettled, webhooks
from smsops.dispatch import DispatchSettings, SlidingWindow
from smsops.providers import (
    Provider,
    SendRequest,
    SendResult,
    from_config,
)
from smsops.providers.sandbox import create_app, run_in_thread, serve_in_thread
from smsops.providers.transport import LeanClient

SENDER = "SHOPMARKET"
QUICK = DispatchSettings(
    rate_per_second=1_000, concurrency=8, clients=4, backoff_base=0.05, unknown_grace=0.0, linger=10,
    settle_window=0.0,
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# A small store


DAYTIME = zone_where_it_is(13)


def numbers(n: int, *, start: int = 1) -> list[str]:
    """``n`` numbers the sandbox accepts (none ends in 00, 13, 14 or 97-99)."""
    out, i = [], start
    while len(out) < n:
        if i % 100 not in (0, 13, 14, 97, 98, 99):
            out.append(f"+7912{i:07d}")
        i += 1
    return out


def make_campaign(
    home: Path,
    phones: list[str],
    *,
    kind: str = "promo",
    opted_in: bool = True,
    time_zone: str = DAYTIME,
    status: str = "running",
) -> int:
    """A launched campaign with one planned message per number."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at, launched_at)"
                " values ('Тест', ?, ?, ?, ?, ?) returning campaign_id",
                (kind, status, SENDER, now, now),
            ).fetchone()
            conn.execute(
                "insert into campaign_variants (campaign_id, variant, template, sender_id) values (?, 'A', 'x', ?)",
                (cid, SENDER),
            )
            first = conn.execute("select coalesce(max(contact_id), 0) + 1 from contacts").fetchone()[0]
            for offset, phone in enumerate(phones):
                contact_id = first + offset
                conn.execute(
                    "insert into contacts (contact_id, phone_e164, phone_valid, time_zone, created_at, updated_at)"
                    " values (?, ?, 1, ?, ?, ?)",
                    (contact_id, phone, time_zone, now, now),
                )
                conn.execute(
                    "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
                    " state, planned_at) values (?, ?, 'A', ?, ?, ?, 'planned', ?)",
                    (f"{cid}:{contact_id}", cid, contact_id, phone, f"Скидка 20% для {phone[-4:]}", now),
                )
        if opted_in:
            consent.record_many(
                conn,
                [
                    consent.ConsentEvent(p, "marketing", "opt_in", "web_form", "2024-01-01 00:00:00")
                    for p in phones
                ],
            )
    finally:
        conn.close()
    return cid


def rows(home: Path, sql: str, *params) -> list[sqlite3.Row]:
    conn = store.open_store(home)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def outbox(home: Path, cid: int) -> list[sqlite3.Row]:
    return rows(home, "select * from messages where campaign_id = ? order by message_id", cid)


def status_of(home: Path, cid: int) -> str:
    return rows(home, "select status from campaigns where campaign_id = ?", cid)[0]["status"]


def sandbox_messages(url: str) -> list[dict]:
    return httpx.get(f"{url}/sandbox/messages", auth=(FAST.account_sid, FAST.auth_token)).json()


@pytest.fixture
def sandbox() -> Iterator:
    with run_in_thread(FAST) as server:
        yield server


def provider_at(url: str, **env: str) -> Provider:
    return from_config("sandbox", {"SANDBOX_URL": url, **env})


class Recording:
    """The real adapter, with a hook before each send and the time each send started."""

    def __init__(self, inner: Provider, before: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.before = before
        self.times: list[float] = []
        self.name = inner.name
        self.is_sandbox = inner.is_sandbox

    async def send(self, client: httpx.AsyncClient, request: SendRequest) -> SendResult:
        self.times.append(time.monotonic())
        if self.before is not None:
            self.before(len(self.times))
        return await self.inner.send(client, request)

    async def lookup(self, client, provider_message_id):
        return await self.inner.lookup(client, provider_message_id)

    async def find(self, client, request, since):
        return await self.inner.find(client, request, since)

    def parse_callback(self, url, form, headers):
        return self.inner.parse_callback(url, form, headers)

    def parse_inbound(self, url, form, headers):
        return self.inner.parse_inbound(url, form, headers)

    def callback_reply(self):
        return self.inner.callback_reply()


def max_in_any_window(times: list[float], period: float = 1.0) -> int:
    """The most timestamps in any closed interval of ``period`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - period:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# ---------------------------------------------------------------------------------------
# Pure parts


def test_sliding_window_never_admits_more_than_the_limit_in_any_second():
    async def admit(n: int) -> list[float]:
        window = SlidingWindow(7, 1.0)
        times = []
        for _ in range(n):
            times.append(await window.acquire())
            window.done()  # answered at once
        return times

    started = time.monotonic()
    times = asyncio.run(admit(22))
    assert max_in_any_window(times) == 7
    assert 3.0 <= time.monotonic() - started < 4.0  # 22 = 7 + 7 + 7 + 1: three full waits


def test_a_slow_answer_keeps_its_place_in_the_window_until_a_second_after_it():
    # the provider may count a send at any moment before its answer: a window counted from
    # admission alone let a stalled batch and the next one meet at the provider
    async def run() -> tuple[float, float, float, float]:
        window = SlidingWindow(3, 1.0)
        first = [await window.acquire() for _ in range(3)]
        await asyncio.sleep(0.4)
        for _ in first:
            window.done()  # all three answered 0.4 s after admission
        fourth, *_ = [await window.acquire() for _ in range(3)]  # the window is full again
        window.unused()  # one of them was not sent after all: its place is free at once
        fifth = await window.acquire()
        for _ in range(3):  # given up on, unanswered: they may still be counted, so hold longer
            window.done(hold=0.5)
        sixth = await window.acquire()
        return first[0], fourth, fifth, sixth

    admitted, fourth, fifth, sixth = asyncio.run(run())
    assert fourth - admitted >= 1.4  # a window from admission would have let it in at 1.0 s
    assert fifth - fourth < 0.1
    assert sixth - fifth >= 1.5


@pytest.mark.parametrize("statement", ["_CLAIM_SQL", "_SUBMITTED_SQL"])
def test_claim_and_submit_find_their_rows_by_message_id_not_by_scanning_a_state(home, statement):
    # driven by the state index, each statement visited every row in that state (the whole
    # campaign) and scanned the batch for each: quadratic, most of the dispatcher's CPU
    conn = store.open_store(home)
    params = ("sandbox", "[]") if statement == "_CLAIM_SQL" else ("[]",)
    plan = " / ".join(
        r[3] for r in conn.execute("explain query plan " + getattr(dispatch, statement), params)
    )
    conn.close()
    assert "SEARCH messages USING INTEGER PRIMARY KEY" in plan, plan
    assert "ix_messages_planned" not in plan, plan


def test_backoff_grows_jitters_and_honours_retry_after():
    import random

    settings = DispatchSettings(backoff_base=1.0, backoff_cap=8.0)
    rng = random.Random(1)
    delays = [dispatch.backoff_delay(n, settings, None, rng) for n in (1, 2, 3, 4, 5, 6)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert all(4.0 <= d <= 8.0 for d in delays[3:])  # capped
    assert dispatch.backoff_delay(1, settings, 30.0, rng) == 30.0  # Retry-After wins, even over the cap


@pytest.mark.parametrize(
    "change",
    [{"rate_per_second": 0}, {"concurrency": 0}, {"clients": 9, "concurrency": 8}, {"max_attempts": 0}],
)
def test_impossible_settings_are_refused(change):
    with pytest.raises(dispatch.DispatchError, match="DispatchSettings"):
        DispatchSettings(**change)


@pytest.mark.parametrize(
    ("rate", "cpus", "expected"),
    [(100, 2, 1), (2_500, 2, 1), (2_501, 2, 2), (5_000, 2, 2), (10_000, 8, 4), (5_000, 1, 1), (0.5, 4, 1)],
)
def test_the_default_process_count_follows_the_rate_and_the_cores(rate, cpus, expected):
    assert dispatch.processes_for(rate, cpus) == expected


def test_the_cli_gives_a_fast_rate_two_processes_unless_told(monkeypatch):
    from smsops import cli, serve

    seen = []
    monkeypatch.setattr(serve, "load_provider", lambda name: object())
    monkeypatch.setattr(dispatch, "processes_for", lambda rate: 2 if rate > 2_500 else 1)

    def capture(**kwargs):
        seen.append(kwargs["processes"])
        raise dispatch.DispatchError("stop here")

    monkeypatch.setattr(dispatch, "DispatchSettings", capture)
    for argv in (["--rate", "5000"], ["--rate", "5000", "--processes", "1"], []):
        assert cli.main(["campaign", "send", "1", *argv]) == 2
    assert seen == [2, 1, 1]


# ---------------------------------------------------------------------------------------
# Outcomes


@pytest.mark.parametrize("http", ["lean", "httpx"])
def test_accepted_messages_are_submitted_with_receipts_and_the_campaign_finishes(home, sandbox, http):
    provider = provider_at(sandbox.url)
    phones = numbers(30)
    cid = make_campaign(home, phones)
    with serve_in_thread(webhooks.create_app({"sandbox": provider}, home=home)) as hooks:
        settings = replace(QUICK, status_callback_url=f"{hooks.url}/webhooks/sandbox/status", http=http)
        report = dispatch.run_sync(home, provider, settings, campaign_id=cid)
        deadline = time.monotonic() + 10
        while rows(home, "select count(*) as n from message_status_events")[0]["n"] < 60:
            assert time.monotonic() < deadline, "receipts did not arrive"
            time.sleep(0.05)
    out = outbox(home, cid)
    accepted = {m["to"]: m["sid"] for m in sandbox_messages(sandbox.url)}
    assert report.stopped == "done" and report.submitted == 30 and report.requests == 30
    assert report.finished == (cid,) and status_of(home, cid) == "finished"
    assert all(r["state"] == "submitted" and r["submitted_at"] and r["attempts"] == 1 for r in out)
    assert {r["phone_e164"]: r["provider_message_id"] for r in out} == accepted
    attempts = rows(home, "select * from send_attempts order by message_id")
    assert [(a["outcome"], a["http_status"], a["provider_message_id"]) for a in attempts] == [
        ("accepted", 201, r["provider_message_id"]) for r in out
    ]
    assert all(a["finished_at"] >= a["started_at"] for a in attempts)
    statuses = Counter(r["status"] for r in rows(home, "select status from message_status_events"))
    assert statuses == {"sent": 30, "delivered": 30}
    assert rows(home, "select count(*) as n from orphan_status_events")[0]["n"] == 0


_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.mark.parametrize(
    ("proxy", "expected"),
    [(None, LeanClient), ("http://127.0.0.1:9", httpx.AsyncClient)],
)
def test_the_dispatcher_sends_with_lean_clients_unless_a_proxy_is_configured(
    home, sandbox, monkeypatch, proxy, expected
):
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    if proxy:  # a proxy for the world, not for the sandbox on loopback
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    clients: list[type] = []

    class Seeing(Recording):
        async def send(self, client, request):
            clients.append(type(client))
            return await super().send(client, request)

    cid = make_campaign(home, numbers(3))
    report = dispatch.run_sync(home, Seeing(provider_at(sandbox.url)), QUICK, campaign_id=cid)
    assert report.submitted == 3 and clients == [expected] * 3


def test_permanent_rejections_are_never_retried_and_a_stop_is_recorded_as_an_opt_out(home, sandbox):
    invalid, stopped, fine = "+79120000100", "+79120000113", "+79120000101"
    cid = make_campaign(home, [invalid, stopped, fine])
    report = dispatch.run_sync(home, provider_at(sandbox.url), QUICK, campaign_id=cid)
    out = {r["phone_e164"]: r for r in outbox(home, cid)}
    assert (out[invalid]["state"], out[invalid]["skip_reason"], out[invalid]["error_code"]) == (
        "rejected", "provider_rejected", "21211",
    )  # fmt: skip
    assert (out[stopped]["state"], out[stopped]["skip_reason"], out[stopped]["error_code"]) == (
        "rejected", "provider_opted_out", "21610",
    )  # fmt: skip
    assert out[fine]["state"] == "submitted"
    assert all(r["attempts"] == 1 for r in out.values())  # never retried
    assert report.rejected == {"provider_rejected": 1, "provider_opted_out": 1}
    assert report.error_codes == {"21211": 1, "21610": 1}
    ledger = rows(home, "select * from consent_events where source = 'provider'")
    assert [(e["phone_e164"], e["purpose"], e["action"]) for e in ledger] == [
        (stopped, "marketing", "opt_out")
    ]
    assert json.loads(ledger[0]["proof"]) == {
        "message_id": out[stopped]["message_id"], "error_code": "21610", "provider": "sandbox",
    }  # fmt: skip
    conn = store.open_store(home)
    try:
        assert consent.state(conn, stopped, "marketing").last_action == "opt_out"
    finally:
        conn.close()
    assert status_of(home, cid) == "finished"


def test_throttled_messages_are_retried_no_sooner_than_retry_after(home):
    settings = replace(FAST, rate_per_second=2)
    with run_in_thread(settings) as server:
        cid = make_campaign(home, numbers(5))
        report = dispatch.run_sync(home, provider_at(server.url), QUICK, campaign_id=cid)
        received = sandbox_messages(server.url)
    assert report.stopped == "done" and report.retried > 0
    assert all(r["state"] == "submitted" for r in outbox(home, cid))
    assert sorted(m["to"] for m in received) == sorted(numbers(5))  # each exactly once
    attempts = rows(home, "select * from send_attempts order by message_id, attempt")
    throttled = [a for a in attempts if a["outcome"] == "transient"]
    assert throttled and all(a["error_code"] == "20429" and a["retry_after"] >= 1 for a in throttled)
    by_message: dict[int, list] = {}
    for a in attempts:
        by_message.setdefault(a["message_id"], []).append(a)
    for tries in by_message.values():
        for before, after in itertools.pairwise(tries):
            gap = datetime.fromisoformat(after["started_at"]) - datetime.fromisoformat(before["finished_at"])
            assert gap >= timedelta(seconds=before["retry_after"])


def test_transient_failures_give_up_after_max_attempts(home):
    closed = "http://127.0.0.1:9"  # nothing listens: connection refused, nothing was sent
    cid = make_campaign(home, numbers(3))
    settings = replace(QUICK, max_attempts=3)
    report = dispatch.run_sync(home, provider_at(closed), settings, campaign_id=cid)
    out = outbox(home, cid)
    assert all(
        (r["state"], r["skip_reason"], r["attempts"]) == ("rejected", "gave_up_after_retries", 3) for r in out
    )
    assert report.retried == 6 and report.rejected == {"gave_up_after_retries": 3}
    assert rows(home, "select count(*) as n from send_attempts where outcome = 'transient'")[0]["n"] == 9
    assert status_of(home, cid) == "finished"


@pytest.mark.parametrize("http", ["lean", "httpx"])
def test_an_ambiguous_answer_is_reconciled_with_the_provider_not_resent(home, http):
    # every request gets a 500/503, and every one of them was accepted anyway
    settings = replace(FAST, transient_error_rate=1.0, ambiguous_error_rate=1.0)
    with run_in_thread(settings) as server:
        cid = make_campaign(home, numbers(4))
        report = dispatch.run_sync(home, provider_at(server.url), replace(QUICK, http=http), campaign_id=cid)
        received = sandbox_messages(server.url)
    out = outbox(home, cid)
    assert report.requests == 4 and report.reconciled == {"found": 4}
    assert {r["phone_e164"]: r["provider_message_id"] for r in out} == {m["to"]: m["sid"] for m in received}
    assert all(r["state"] == "submitted" and r["attempts"] == 1 for r in out)
    attempts = rows(home, "select outcome, reconciled from send_attempts")
    assert [tuple(a) for a in attempts] == [("unknown", "found")] * 4


def test_an_ambiguous_answer_the_provider_has_no_record_of_is_sent_again(home):
    settings = replace(FAST, transient_error_rate=1.0, ambiguous_error_rate=0.0)
    with run_in_thread(settings) as server:
        cid = make_campaign(home, numbers(2))
        report = dispatch.run_sync(
            home,
            provider_at(server.url),
            replace(QUICK, max_attempts=2),
            campaign_id=cid,
        )
    assert report.requests == 4 and report.reconciled == {"absent": 4}
    assert all(
        (r["state"], r["skip_reason"]) == ("rejected", "gave_up_after_retries") for r in outbox(home, cid)
    )


class Unsearchable(Recording):
    """A provider that answers every send ambiguously and cannot search its records."""

    async def send(self, client, request):
        self.times.append(time.monotonic())
        return SendResult("unknown", http_status=504, error_message="gateway timeout")

    async def find(self, client, request, since):
        return None


def test_a_fate_the_provider_cannot_tell_is_marked_unknown_and_never_resent(home, sandbox):
    provider = Unsearchable(provider_at(sandbox.url))
    cid = make_campaign(home, numbers(3))
    report = dispatch.run_sync(home, provider, QUICK, campaign_id=cid)
    again = dispatch.run_sync(home, provider, QUICK, campaign_id=cid)
    out = outbox(home, cid)
    assert len(provider.times) == 3 and again.requests == 0
    assert all((r["state"], r["skip_reason"]) == ("unknown", "fate_unknown") for r in out)
    assert report.unknown == 3 and report.reconciled == {"unsearchable": 3}
    assert dispatch.progress(cid, home).reasons == {"fate_unknown": 3}
    # not finished while nobody knows whether they were sent: a person decides, and it is recorded
    assert status_of(home, cid) == "running"
    assert unsettled.count(cid, home).needs_a_person == 3
    assert unsettled.decide(cid, "give_up", by="anna", home=home) == 3
    assert status_of(home, cid) == "finished"
    assert [tuple(r) for r in rows(home, "select decision, messages, decided_by from outbox_decisions")] == [
        ("give_up", 3, "anna")
    ]


def test_refused_credentials_pause_the_campaign_without_quoting_the_secret(home, sandbox):
    secret = "not-the-right-token-0123"
    provider = provider_at(sandbox.url, SANDBOX_AUTH_TOKEN=secret)
    cid = make_campaign(home, numbers(20))
    report = dispatch.run_sync(home, provider, QUICK, campaign_id=cid)
    assert report.stopped == "credentials" and status_of(home, cid) == "paused"
    assert "refused the credentials" in report.error and secret not in report.error
    assert {r["state"] for r in outbox(home, cid)} == {"planned"}
    assert report.submitted == 0 and 1 <= report.requests <= QUICK.concurrency
    assert {a["outcome"] for a in rows(home, "select outcome from send_attempts")} == {"auth_refused"}
    assert sandbox_messages(sandbox.url) == []


# ---------------------------------------------------------------------------------------
# Consent, quiet hours, campaign status


def test_opt_out_mid_campaign_stops_remaining_sends(home, sandbox):
    phones = numbers(40)
    cid = make_campaign(home, phones)
    late = phones[-10:]

    def opt_out_the_last_ten(sends: int) -> None:
        if sends == 5:
            conn = store.open_store(home)
            try:
                consent.record_many(
                    conn,
                    [
                        consent.ConsentEvent(p, "marketing", "opt_out", "keyword_reply", datetime.now(UTC))
                        for p in late
                    ],
                )
            finally:
                conn.close()

    provider = Recording(provider_at(sandbox.url), before=opt_out_the_last_ten)
    settings = DispatchSettings(rate_per_second=20, concurrency=2, clients=1, linger=5)
    report = dispatch.run_sync(home, provider, settings, campaign_id=cid)
    received = {m["to"] for m in sandbox_messages(sandbox.url)}
    assert received == set(phones[:30])
    out = {r["phone_e164"]: r for r in outbox(home, cid)}
    assert all((out[p]["state"], out[p]["skip_reason"]) == ("suppressed", "opted_out") for p in late)
    assert report.suppressed == {"opted_out": 10}
    # the suppressed were never attempted
    assert rows(home, "select count(*) as n from send_attempts")[0]["n"] == 30


def test_consent_is_checked_at_dispatch_not_only_at_planning(home, sandbox):
    cid = make_campaign(home, numbers(3), opted_in=False)
    service = make_campaign(home, numbers(2, start=500), kind="service", opted_in=False)
    dispatch.run_sync(home, provider_at(sandbox.url), QUICK, campaign_id=cid)
    dispatch.run_sync(home, provider_at(sandbox.url), QUICK, campaign_id=service)
    assert {(r["state"], r["skip_reason"]) for r in outbox(home, cid)} == {("suppressed", "no_consent")}
    assert {r["state"] for r in outbox(home, service)} == {"submitted"}  # service needs no opt-in


def test_a_recipient_in_quiet_hours_now_is_deferred_not_sent(home, sandbox):
    night = zone_where_it_is(23)
    cid = make_campaign(home, numbers(2), time_zone=night)
    report = dispatch.run_sync(home, provider_at(sandbox.url), QUICK, campaign_id=cid)
    out = outbox(home, cid)
    assert report.requests == 0 and report.deferred == 2 and sandbox_messages(sandbox.url) == []
    assert all((r["state"], r["skip_reason"], r["attempts"]) == ("planned", "quiet_hours", 0) for r in out)
    local = datetime.fromisoformat(out[0]["not_before"]).replace(tzinfo=UTC).astimezone(ZoneInfo(night))
    assert local.hour == 9 and local.minute == 0
    assert status_of(home, cid) == "running"  # not finished: it still has someone to reach


def test_pause_then_resume_sends_everyone_once(home, sandbox):
    phones = numbers(30)
    cid = make_campaign(home, phones)

    def pause_early(sends: int) -> None:
        if sends == 5:
            campaigns.pause(cid, home)

    settings = DispatchSettings(rate_per_second=20, concurrency=2, clients=1, linger=5)
    first = dispatch.run_sync(
        home, Recording(provider_at(sandbox.url), pause_early), settings, campaign_id=cid
    )
    assert first.stopped == "paused" and status_of(home, cid) == "paused"
    waiting = [r for r in outbox(home, cid) if r["state"] == "planned"]
    assert waiting and all(r["attempts"] == 0 for r in waiting)
    refused = dispatch.run_sync(home, provider_at(sandbox.url), settings, campaign_id=cid)
    assert refused.requests == 0 and "resume it first" in refused.error
    campaigns.resume(cid, home)
    dispatch.run_sync(home, provider_at(sandbox.url), QUICK, campaign_id=cid)
    assert sorted(m["to"] for m in sandbox_messages(sandbox.url)) == sorted(phones)
    assert status_of(home, cid) == "finished"


def test_cancel_mid_campaign_cancels_the_rest_and_never_finishes(home, sandbox):
    cid = make_campaign(home, numbers(30))

    def cancel_early(sends: int) -> None:
        if sends == 5:
            campaigns.cancel(cid, home)

    settings = DispatchSettings(rate_per_second=20, concurrency=2, clients=1, linger=5)
    report = dispatch.run_sync(
        home, Recording(provider_at(sandbox.url), cancel_early), settings, campaign_id=cid
    )
    states = Counter(r["state"] for r in outbox(home, cid))
    assert report.stopped == "cancelled" and status_of(home, cid) == "cancelled"
    assert set(states) == {"submitted", "cancelled"} and states["submitted"] == report.submitted < 30
    assert {r["skip_reason"] for r in outbox(home, cid) if r["state"] == "cancelled"} == {"cancelled"}
    assert len(sandbox_messages(sandbox.url)) == states["submitted"]


def test_the_rate_limit_holds_in_every_one_second_window(home, sandbox):
    cid = make_campaign(home, numbers(90))
    provider = Recording(provider_at(sandbox.url))
    settings = DispatchSettings(rate_per_second=30, concurrency=16, clients=4)
    report = dispatch.run_sync(home, provider, settings, campaign_id=cid, record_send_times=True)
    assert report.submitted == 90
    assert max_in_any_window(provider.times) == 30  # busy, but never over
    assert max_in_any_window(list(report.send_times)) == 30
    assert 2.0 <= provider.times[-1] - provider.times[0] < 4.0


def test_the_rate_limit_holds_at_the_provider_when_answers_take_long(home):
    # the sandbox counts a send after its latency (0-0.6 s) and throttles at the same limit:
    # sends held up on the way must not meet the next second's sends there
    settings = replace(FAST, latency=(0.0, 0.6), rate_per_second=10)
    with run_in_thread(settings) as server:
        cid = make_campaign(home, numbers(30))
        limits = DispatchSettings(rate_per_second=10, concurrency=10, clients=5)
        report = dispatch.run_sync(home, provider_at(server.url), limits, campaign_id=cid)
    assert report.submitted == 30 and report.requests == 30 and report.retried == 0
    assert rows(home, "select count(*) as n from send_attempts where error_code = '20429'")[0]["n"] == 0


def test_progress_counts_rows_by_state(home, sandbox):
    cid = make_campaign(home, ["+79120000100", *numbers(3)])
    before = dispatch.progress(cid, home)
    assert (before.total, before.due, before.done, before.fraction) == (4, 4, 0, 0.0)
    seen = []
    dispatch.run_sync(home, provider_at(sandbox.url), QUICK, campaign_id=cid, progress=seen.append)
    after = dispatch.progress(cid, home)
    assert after.states == {"submitted": 3, "rejected": 1} and after.reasons == {"provider_rejected": 1}
    assert (after.status, after.done, after.fraction, after.submitted) == ("finished", 4, 1.0, 3)


# ---------------------------------------------------------------------------------------
# Crashes and concurrency


def test_rows_left_sending_are_reconciled_at_start_up(home, sandbox):
    """What a crash leaves: one row the provider accepted before the process died, one it never
    received. The first is recorded with the provider's id, the second sent once."""
    sent_before, never_sent = numbers(2)
    cid = make_campaign(home, [sent_before, never_sent])
    provider = provider_at(sandbox.url)
    claimed = datetime.now(UTC) - timedelta(seconds=5)

    async def send_directly() -> SendResult:
        async with httpx.AsyncClient() as client:
            return await provider.send(
                client, SendRequest(0, sent_before, SENDER, outbox(home, cid)[0]["body"])
            )

    first_sid = asyncio.run(send_directly()).provider_message_id
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            conn.execute("update messages set state = 'sending', attempts = 1, provider = 'sandbox'")
            conn.execute(
                "insert into send_attempts (message_id, attempt, provider, dispatcher, started_at)"
                " select message_id, 1, 'sandbox', 'dead:1', ? from messages",
                (claimed.replace(tzinfo=None).isoformat(sep=" "),),
            )
    finally:
        conn.close()
    report = dispatch.run_sync(home, provider, QUICK, campaign_id=cid)
    out = {r["phone_e164"]: r for r in outbox(home, cid)}
    assert out[sent_before]["provider_message_id"] == first_sid and out[sent_before]["attempts"] == 1
    assert out[never_sent]["state"] == "submitted" and out[never_sent]["attempts"] == 2
    assert sorted(m["to"] for m in sandbox_messages(sandbox.url)) == sorted([sent_before, never_sent])
    assert report.reconciled == {"found": 1, "absent": 1}
    interrupted = rows(home, "select reconciled from send_attempts where outcome = 'interrupted' order by 1")
    assert [r["reconciled"] for r in interrupted] == ["absent", "found"]


RUNNER = textwrap.dedent(
    """
    import sys
    from smsops import dispatch
    from smsops.providers import from_config
    home, url, campaign = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = dispatch.DispatchSettings(
        rate_per_second=100, concurrency=8, clients=4, batch_size=10, exclusive=False
    )
    print("ready", flush=True)
    sys.stdin.readline()  # both start together, however long each took to import
    report = dispatch.run_sync(home, from_config("sandbox", {"SANDBOX_URL": url}), settings, campaign_id=campaign)
    print(report.requests)
    """
)


def test_two_dispatchers_at_once_never_send_a_message_twice(home):
    latency = replace(FAST, latency=(0.005, 0.02))
    with run_in_thread(latency) as server:
        phones = numbers(300)
        cid = make_campaign(home, phones)
        runners = [
            subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(home), server.url, str(cid)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for runner in runners:
            assert runner.stdout.readline().strip() == "ready"
        for runner in runners:
            runner.stdin.write("go\n")
            runner.stdin.flush()
        requests = [int(p.communicate(timeout=60)[0]) for p in runners]
        received = Counter(m["to"] for m in sandbox_messages(server.url))
    assert sum(requests) == 300 and min(requests) > 0  # both took part
    assert received == Counter(phones)
    assert all(r["state"] == "submitted" for r in outbox(home, cid))


class ArrivalLog:
    """ASGI middleware: when each send reached the sandbox."""

    def __init__(self, app) -> None:
        self.app = app
        self.times: list[float] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/Messages.json"):
            self.times.append(time.monotonic())
        await self.app(scope, receive, send)


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_mid_campaign_then_restart_loses_and_duplicates_nothing(home, processes):
    """A real crash: `smsops campaign send` killed with SIGKILL mid-way (one process three times,
    two processes once: the helper dies with the process that started it), then run to the end."""
    settings = replace(FAST, latency=(0.05, 0.25), transient_error_rate=0.05, ambiguous_error_rate=0.5)
    app = ArrivalLog(create_app(settings))
    phones = [*numbers(197), "+79120000113", "+79120000100", "+79120000214"]
    cid = make_campaign(home, phones)
    rate = 40
    with serve_in_thread(app) as server:
        env = {
            **os.environ,
            "SMSOPS_HOME": str(home),
            "SANDBOX_URL": server.url,
            "SMSOPS_PROVIDER": "sandbox",
        }
        command = [sys.executable, "-m", "smsops.cli", "campaign", "send", str(cid), "--rate", str(rate),
                   "--concurrency", "8", "--processes", str(processes)]  # fmt: skip
        # one process is killed three times, two processes once (the helper dies with its parent)
        for killed_at in (25, 60, 95) if processes == 1 else (25,):
            first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 40
            while (
                rows(home, "select count(*) as n from messages where state = 'submitted'")[0]["n"] < killed_at
            ):
                assert first.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            left, arrived = Counter(r["state"] for r in outbox(home, cid)), len(app.times)
            time.sleep(1.0)
            assert len(app.times) == arrived  # nothing survived the kill to go on sending (a helper)
            assert left["sending"] > 0  # killed mid-way, with requests in flight
            assert left["planned"] > 0 or killed_at > 25
            assert status_of(home, cid) == "running"
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        received = sandbox_messages(server.url)
    out = outbox(home, cid)
    assert {r["state"] for r in out} <= dispatch.TERMINAL_STATES
    assert status_of(home, cid) == "finished"
    finished_at = rows(home, "select finished_at from campaigns where campaign_id = ?", cid)[0]["finished_at"]
    assert finished_at >= max(r["submitted_at"] for r in out if r["submitted_at"])[:19]
    # exactly once at the provider, and the outbox knows each accepted message's id
    assert Counter(m["to"] for m in received) == Counter(
        r["phone_e164"] for r in out if r["state"] == "submitted"
    )
    assert {m["sid"] for m in received} == {
        r["provider_message_id"] for r in out if r["state"] == "submitted"
    }
    # none lost: only the sandbox's permanent refusals are not submitted
    assert {r["phone_e164"] for r in out if r["state"] != "submitted"} == {
        "+79120000113",
        "+79120000100",
        "+79120000214",
    }
    # every request the sandbox saw is a stored attempt, and every attempt has its outcome
    attempts = rows(home, "select * from send_attempts")
    assert len(app.times) <= len(attempts)
    assert all(a["outcome"] and a["finished_at"] for a in attempts)
    assert any(a["outcome"] == "interrupted" for a in attempts)
    assert max_in_any_window(app.times) <= rate
    assert "submitted" in second.stdout


def test_helper_processes_share_the_work_and_the_rate(home, sandbox):
    # six seconds of sending: a helper process that takes a few seconds to start on a loaded
    # machine still finds work to share (at 2 s it sometimes found the campaign done)
    phones = numbers(240)
    cid = make_campaign(home, phones)
    settings = DispatchSettings(rate_per_second=40, concurrency=8, clients=4, processes=2, batch_size=10)
    report = dispatch.run_sync(
        home, provider_at(sandbox.url), settings, campaign_id=cid, record_send_times=True
    )
    assert report.submitted == 240 and report.requests == 240 and status_of(home, cid) == "finished"
    assert sorted(m["to"] for m in sandbox_messages(sandbox.url)) == sorted(phones)
    dispatchers = Counter(a["dispatcher"] for a in rows(home, "select dispatcher from send_attempts"))
    assert len(dispatchers) == 2 and min(dispatchers.values()) >= 10
    assert max_in_any_window(list(report.send_times)) <= 40  # 20 each


def test_serve_runs_webhooks_sandbox_and_dispatcher_until_stopped(home, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SANDBOX_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SMSOPS_PROVIDER", "sandbox")
    phones = numbers(20)
    cid = make_campaign(home, phones)
    started: list[serve.Services] = []

    async def main() -> None:
        stop = asyncio.Event()
        settings = serve.ServeSettings(
            port=0,
            dispatch=DispatchSettings(rate_per_second=200, concurrency=8, clients=4, poll_interval=0.2),
        )
        task = asyncio.create_task(serve.run(home, settings, stop=stop, ready=started.append))
        deadline = time.monotonic() + 20
        while (
            rows(home, "select count(*) as n from message_status_events where status = 'sent'")[0]["n"] < 18
        ):
            assert time.monotonic() < deadline and not task.done(), "receipts did not arrive"
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient() as client:  # a reply through the sandbox to the webhook app
            answer = await client.post(
                f"{started[0].sandbox_url}/sandbox/inbound",
                data={"From": phones[0], "Body": "STOP"},
                auth=(started[0].provider.account_sid, started[0].provider.auth_token),
            )
        assert answer.status_code == 200, answer.text
        stop.set()
        await asyncio.wait_for(task, 15)

    asyncio.run(main())
    services = started[0]
    assert services.sandbox_url == f"http://127.0.0.1:{port}"
    assert services.status_callback_url.endswith("/webhooks/sandbox/status")
    assert status_of(home, cid) == "finished"
    conn = store.open_store(home)
    try:
        assert consent.state(conn, phones[0], "marketing").last_action == "opt_out"
    finally:
        conn.close()
    with pytest.raises(httpx.HTTPError):  # everything stopped
        httpx.get(f"{services.sandbox_url}/sandbox/health", timeout=1)


class SlowLookups(Recording):
    """The real adapter, whose lookups take ``delay`` seconds (a provider slow to answer them),
    counting them by message."""

    def __init__(self, inner: Provider, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay
        self.lookups: Counter[int] = Counter()

    async def find(self, client, request, since):
        self.lookups[request.message_id] += 1
        await asyncio.sleep(self.delay)
        return await self.inner.find(client, request, since)


def test_an_unknown_row_is_looked_up_once_until_the_outcome_of_its_lookup_is_written(home, caplog):
    """Every send is answered 5xx and never accepted: each row is looked up after its settle
    window, found absent, sent again. A lookup that ends just before the dispatcher's next look
    for rows due one must not be asked again while its outcome waits to be written (it was:
    two lookups of the same attempt, the second one's outcome refused as "no longer this
    dispatcher's claim")."""
    phones = numbers(12)
    cid = make_campaign(home, phones)
    failing = replace(FAST, transient_error_rate=1.0, ambiguous_error_rate=0.0)
    settings = replace(QUICK, settle_window=0.6, max_attempts=3, linger=30)
    with run_in_thread(failing) as server:
        provider = SlowLookups(provider_at(server.url), delay=0.47)  # the watcher looks every 0.5 s
        with caplog.at_level("WARNING", logger="smsops.dispatch"):
            report = dispatch.run_sync(home, provider, settings, campaign_id=cid)
    claims = [r.getMessage() for r in caplog.records if "no longer this dispatcher's claim" in r.getMessage()]
    assert claims == []
    assert report.requests == 3 * len(phones)
    # each attempt: a lookup within its settle window (unless it took longer), one after it
    assert max(provider.lookups.values()) <= 2 * 3
    assert {r["skip_reason"] for r in outbox(home, cid)} == {"gave_up_after_retries"}


@pytest.mark.parametrize(("rate", "expected"), [(100, 32), (500, 75), (1_000, 150), (2_000, 300)])
def test_requests_in_flight_follow_the_rate_unless_given(rate, expected):
    """At 20–80 ms answers 32 requests in flight cap ~640 msg/s: `smsops serve` and `campaign
    send` take rate × 0.1 s × 1.5 (at least 32) unless --concurrency says otherwise."""
    assert dispatch.concurrency_for(rate) == expected
    args = cli.parser().parse_args(["serve", "--rate", str(rate)])
    assert args.concurrency is None
    assert cli.parser().parse_args(["serve", "--rate", str(rate), "--concurrency", "7"]).concurrency == 7
