"""The opt-out gate: an opt-out stops every provider request that starts after it is recorded,
also for rows already claimed and checked (DESIGN.md invariant 2; smsops.revocations)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from smsops import consent, dispatch, ingress, store, webhooks
from smsops.dispatch import DispatchSettings
from smsops.providers.sandbox import run_in_thread, serve_in_thread
from smsops.providers.twilio import request_signature
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
