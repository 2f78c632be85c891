"""The opt-out gate: an opt-out stops every provider request that starts after it is recorded,
also for rows already claimed and checked (DESIGN.md invariant 2; smsops.revocations)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from smsops import consent, dispatch, ingress, store, webhooks
from smsops.dispatch import DispatchSettings
from smsops.providers.sandbox import run_in_thread, serve_in_thread
from smsops.providers.twilio import request_signature
from smsops.revocations import Revocations
from tests.test_dispatch import (
    FAST,
    Recording,
    make_campaign,
    numbers,
    outbox,
    provider_at,
    rows,
)

SLOW = DispatchSettings(rate_per_second=2, concurrency=2, clients=1, linger=5, unknown_grace=0.0)
FULL = DispatchSettings(rate_per_second=1_000, concurrency=8, clients=4, linger=5, unknown_grace=0.0)


@pytest.fixture
def sandbox():
    with run_in_thread(FAST) as server:
        yield server


def sent_to(home, cid) -> list[str]:
    """Numbers a request was made for, in order (the attempts table: one row per request)."""
    return [
        r["phone_e164"]
        for r in rows(
            home,
            "select m.phone_e164 from send_attempts a join messages m using (message_id)"
            " where m.campaign_id = ? order by a.started_at, a.message_id",
            cid,
        )
    ]


def post_stop(url: str, phone: str, n: int) -> None:
    form = {"MessageSid": f"SM{n:032x}", "From": phone, "To": "SHOPMARKET", "Body": "СТОП"}
    full = url + "/webhooks/sandbox/inbound"
    signature = request_signature(provider_at(url).auth_token, full, form)
    answer = httpx.post(full, data=form, headers={"X-Twilio-Signature": signature})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("settings", [SLOW, FULL], ids=["2 msg/s", "full rate"])
def test_a_stop_journaled_for_claimed_recipients_stops_every_send_after_it(home, sandbox, settings):
    phones = numbers(12)
    cid = make_campaign(home, phones)
    first = 3
    # the receiver journals but does not apply: the STOPs are only in the journal when they count
    hooks = serve_in_thread(
        webhooks.create_app({"sandbox": provider_at(sandbox.url)}, home=home, apply=False)
    )

    def stop_the_rest(sends: int) -> None:
        if sends == first:  # every row is claimed and checked by now
            assert rows(home, "select count(*) as n from messages where state = 'sending'")[0]["n"] > 1
            for n, phone in enumerate(phones[first:]):
                post_stop(hooks.url, phone, n)

    provider = Recording(provider_at(sandbox.url), before=stop_the_rest)
    try:
        report = dispatch.run_sync(home, provider, settings, campaign_id=cid)
    finally:
        hooks.close()
    assert ingress.pending(home) == len(phones) - first  # not applied: the gate read the journal
    assert len(provider.times) == first
    assert set(sent_to(home, cid)) <= set(phones[:first]) and len(sent_to(home, cid)) == first
    out = {r["phone_e164"]: r for r in outbox(home, cid)}
    assert all(
        (out[p]["state"], out[p]["skip_reason"]) == ("suppressed", "opted_out") for p in phones[first:]
    )
    assert report.suppressed == {"opted_out": len(phones) - first}


@pytest.mark.parametrize("settings", [SLOW, FULL], ids=["2 msg/s", "full rate"])
def test_an_opt_out_in_the_ledger_after_the_check_stops_claimed_rows(home, sandbox, settings):
    phones = numbers(12)
    cid = make_campaign(home, phones)
    first = 3

    def staff_opt_out(sends: int) -> None:
        if sends == first:
            conn = store.open_store(home)
            try:
                consent.record_many(
                    conn,
                    [
                        consent.ConsentEvent(p, "marketing", "opt_out", "admin", datetime.now(UTC))
                        for p in phones[first:]
                    ],
                )
            finally:
                conn.close()

    provider = Recording(provider_at(sandbox.url), before=staff_opt_out)
    report = dispatch.run_sync(home, provider, settings, campaign_id=cid)
    assert len(provider.times) == first
    assert report.suppressed == {"opted_out": len(phones) - first}


def test_a_start_after_a_journaled_stop_lets_the_number_through_again(home, sandbox):
    phones = numbers(4)
    cid = make_campaign(home, phones)
    hooks = serve_in_thread(
        webhooks.create_app({"sandbox": provider_at(sandbox.url)}, home=home, apply=False)
    )
    try:
        post_stop(hooks.url, phones[0], 1)
        form = {"MessageSid": f"SM{2:032x}", "From": phones[0], "To": "SHOPMARKET", "Body": "START"}
        full = hooks.url + "/webhooks/sandbox/inbound"
        signature = request_signature(provider_at(sandbox.url).auth_token, full, form)
        assert httpx.post(full, data=form, headers={"X-Twilio-Signature": signature}).status_code == 200
        dispatch.run_sync(home, provider_at(sandbox.url), FULL, campaign_id=cid)
    finally:
        hooks.close()
    assert {r["state"] for r in outbox(home, cid)} == {"submitted"}


def _stop(phone: str) -> ingress.Entry:
    payload = {"provider": "sandbox", "provider_message_id": "SM1", "from": phone, "to": "SHOP", "body": "STOP",
               "received_at": "2026-12-07T10:00:00+00:00"}  # fmt: skip
    return ingress.Entry("inbound", payload, "sandbox", phone, "stop")


def _receipt(n: int) -> ingress.Entry:
    return ingress.Entry("status", {"updates": [["sandbox", f"SM{n:032x}", "delivered", None,
                                                 "2026-12-07T10:00:00+00:00"]]}, "sandbox")  # fmt: skip


@pytest.fixture
def gate(home):
    conn = store.open_store(home)
    revocations = Revocations(conn, ingress.journal_path(home))
    yield revocations
    revocations.close()
    conn.close()


def test_receipts_journaled_cost_the_gate_no_read_of_the_journal_and_a_stop_is_seen_at_once(home, gate):
    journal = ingress.Journal(ingress.journal_path(home))
    try:
        phone = numbers(1)[0]
        reads = gate.journal_reads
        for n in range(50):  # a campaign's receipts: each its own journal commit
            journal.append_sync([_receipt(n)])
            assert gate.verdict(phone, gate.mark) is None
        assert gate.journal_reads == reads
        journal.append_sync([_stop(phone)])
        assert gate.verdict(phone, gate.mark) == "opted_out"  # the very next check
        assert gate.journal_reads == reads + 1
    finally:
        journal.close()


def test_a_stop_committed_while_its_writer_has_not_counted_it_done_still_stops_the_send(home, gate):
    """A writer counts ``begun``, commits the STOP, then counts ``done``: a check in between
    must read the journal although ``done`` has not moved."""
    phone = numbers(1)[0]
    assert gate.verdict(phone, gate.mark) is None
    kconn = ingress.connect_keywords(ingress.journal_path(home))
    jconn = ingress.connect(ingress.journal_path(home))
    try:
        kconn.execute("update keyword_writes set begun = begun + 1")
        assert gate.verdict(phone, gate.mark) is None  # under way, nothing committed yet
        jconn.execute(
            "insert into entries (kind, provider, phone, keyword, payload, received_at)"
            " values ('inbound', 'sandbox', ?, 'stop', '{}', '2026-12-07 10:00:00')",
            (phone,),
        )
        assert gate.verdict(phone, gate.mark) == "opted_out"
        kconn.execute("update keyword_writes set done = done + 1")
        assert gate.verdict(phone, gate.mark) == "opted_out"
    finally:
        kconn.close()
        jconn.close()


def test_an_opt_out_another_process_records_is_seen_by_the_next_check(home, gate):
    phone, other = numbers(2)
    checked = gate.mark
    assert gate.verdict(phone, checked) is None
    subprocess.run(
        [sys.executable, "-c", _OPT_OUT, str(home), phone], check=True, timeout=60, capture_output=True
    )
    assert gate.verdict(phone, checked) == "recheck"
    assert gate.verdict(other, checked) is None


_OPT_OUT = """
import sys
from datetime import UTC, datetime
from smsops import consent, store
conn = store.open_store(sys.argv[1])
consent.record_many(conn, [consent.ConsentEvent(sys.argv[2], "marketing", "opt_out", "admin", datetime.now(UTC))])
"""
