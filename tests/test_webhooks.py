"""Webhooks over real HTTP on loopback: receipts, replies and clicks land in the store."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from smsops import consent, store, webhooks
from smsops.providers import SANDBOX_AUTH_TOKEN, from_config
from smsops.providers.sandbox import serve_in_thread
from smsops.providers.twilio import request_signature

SID = "SM" + "ab" * 16


@pytest.fixture
def receiver(home):
    conn = store.open_store(home)
    conn.execute(
        "insert into campaigns (campaign_id, name, kind, status, created_at) values (1, 'c', 'promo', 'running', '2026-01-01')"
    )
    conn.execute(
        "insert into messages (message_id, idempotency_key, campaign_id, variant, contact_id, phone_e164, state,"
        " provider, provider_message_id, planned_at) values"
        " (7, '1:1', 1, 'A', 1, '+79123456789', 'submitted', 'sandbox', ?, '2026-01-01 10:00:00')",
        (SID,),
    )
    conn.execute(
        "insert into links (token, message_id, url, created_at) values ('Tok3nAbc', 7,"
        " 'https://shop.example.ru/sale?utm_source=sms', '2026-01-01 10:00:00')"
    )
    conn.execute(
        "insert into consent_events (event_key, phone_e164, purpose, action, source, occurred_at, recorded_at)"
        " values ('in', '+79123456789', 'marketing', 'opt_in', 'web_form', '2025-01-01 00:00:00', '2025-01-01 00:00:00')"
    )
    app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=home)
    with serve_in_thread(app) as server:
        yield server.url, conn


def post_signed(
    url: str, path: str, form: dict[str, str], *, token: str = SANDBOX_AUTH_TOKEN
) -> httpx.Response:
    full = url + path
    signature = request_signature(token, full, form)
    return httpx.post(full, data=form, headers={"X-Twilio-Signature": signature})


def statuses(conn: sqlite3.Connection) -> list[tuple]:
    return conn.execute("select status, error_code from message_status_events order by event_id").fetchall()


def test_signed_receipts_are_stored_once_and_out_of_order_is_harmless(receiver):
    url, conn = receiver
    delivered = {"MessageSid": SID, "MessageStatus": "delivered"}
    assert post_signed(url, "/webhooks/sandbox/status", delivered).status_code == 200
    assert post_signed(url, "/webhooks/sandbox/status", delivered).status_code == 200  # twice
    assert (
        post_signed(url, "/webhooks/sandbox/status", {"MessageSid": SID, "MessageStatus": "sent"}).status_code
        == 200
    )
    assert statuses(conn) == [("delivered", None), ("sent", None)]


def test_a_forged_or_unsigned_receipt_is_refused_and_nothing_is_stored(receiver, caplog):
    url, conn = receiver
    form = {"MessageSid": SID, "MessageStatus": "failed", "ErrorCode": "30003"}
    assert post_signed(url, "/webhooks/sandbox/status", form, token="not-the-token").status_code == 403
    assert httpx.post(url + "/webhooks/sandbox/status", data=form).status_code == 403
    assert statuses(conn) == []
    assert "refused (403)" in caplog.text


def test_a_malformed_receipt_gets_400(receiver):
    url, conn = receiver
    assert post_signed(url, "/webhooks/sandbox/status", {"MessageStatus": "delivered"}).status_code == 400
    assert statuses(conn) == []


def test_a_receipt_before_its_message_id_is_recorded_is_kept_and_adopted_later(receiver):
    url, conn = receiver
    early = "SM" + "cd" * 16
    form = {"MessageSid": early, "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert post_signed(url, "/webhooks/sandbox/status", form).status_code == 200
    assert statuses(conn) == []
    conn.execute(
        "insert into messages (message_id, idempotency_key, campaign_id, variant, contact_id, state, provider,"
        " provider_message_id, planned_at) values (8, '1:2', 1, 'A', 2, 'submitted', 'sandbox', ?, '2026-01-01')",
        (early,),
    )
    assert webhooks.adopt_orphans(conn) == 1
    assert statuses(conn) == [("undelivered", "30003")]
    assert conn.execute("select count(*) from orphan_status_events").fetchone()[0] == 0


def test_a_stop_reply_opts_the_number_out_and_gets_the_auto_reply(receiver):
    url, conn = receiver
    form = {"MessageSid": "SM" + "ef" * 16, "From": "+79123456789", "To": "SHOPMARKET", "Body": " Стоп! "}
    reply = post_signed(url, "/webhooks/sandbox/inbound", form)
    assert reply.status_code == 200 and "<Message>" in reply.text
    assert consent.may_send(conn, "+79123456789", "promo") == (False, "opted_out")
    again = post_signed(url, "/webhooks/sandbox/inbound", form)
    assert again.status_code == 200
    assert conn.execute("select count(*) from inbound_messages").fetchone()[0] == 1


def test_a_tracked_link_records_the_click_and_redirects_to_the_stored_address(receiver):
    url, conn = receiver
    answer = httpx.get(
        url + "/l/Tok3nAbc", headers={"User-Agent": "Mozilla/5.0 (iPhone)"}, follow_redirects=False
    )
    assert answer.status_code == 302
    assert answer.headers["location"] == "https://shop.example.ru/sale?utm_source=sms"
    assert conn.execute("select message_id, user_agent from clicks").fetchall() == [
        (7, "Mozilla/5.0 (iPhone)")
    ]
    for bad in ("/l/unknown-token", "/l/Tok3nAbc%2F..%2Fx", "/l/https:%2F%2Fevil.example"):
        assert httpx.get(url + bad, follow_redirects=False).status_code == 404
