"""Webhooks over real HTTP on loopback: receipts, replies and clicks land in the store."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest

from smsops import consent, ingress, store, webhooks
from smsops.providers import SANDBOX_AUTH_TOKEN, StatusUpdate, from_config
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
        yield server.url, conn, app
    conn.close()


def add_messages(conn: sqlite3.Connection, n: int, provider: str = "sandbox") -> list[str]:
    """``n`` more submitted messages; their provider ids."""
    ids = [f"SM{i:032x}" for i in range(1000, 1000 + n)]
    conn.executemany(
        "insert into messages (idempotency_key, campaign_id, variant, contact_id, state, provider,"
        " provider_message_id, planned_at) values (?, 1, 'A', ?, 'submitted', ?, ?, '2026-01-01')",
        [(f"1:x{i}", 100 + i, provider, sid) for i, sid in enumerate(ids)],
    )
    return ids


def holding_the_write_lock(home) -> sqlite3.Connection:
    """Another process's writer, as SQLite sees it: a transaction holding the store's write lock."""
    other = sqlite3.connect(store.store_path(home), isolation_level=None, check_same_thread=False)
    other.execute("begin immediate")
    return other


def post_signed(
    url: str, path: str, form: dict[str, str], *, token: str = SANDBOX_AUTH_TOKEN
) -> httpx.Response:
    full = url + path
    signature = request_signature(token, full, form)
    return httpx.post(full, data=form, headers={"X-Twilio-Signature": signature})


def applied(app) -> None:
    """Wait until the app's applier has moved everything journaled into the store."""
    assert app.state.applier.drain(timeout=20), app.state.applier.last_error


def statuses(conn: sqlite3.Connection) -> list[tuple]:
    return conn.execute("select status, error_code from message_status_events order by event_id").fetchall()


def test_signed_receipts_are_stored_once_and_out_of_order_is_harmless(receiver):
    url, conn, app = receiver
    delivered = {"MessageSid": SID, "MessageStatus": "delivered"}
    assert post_signed(url, "/webhooks/sandbox/status", delivered).status_code == 200
    assert post_signed(url, "/webhooks/sandbox/status", delivered).status_code == 200  # twice
    assert (
        post_signed(url, "/webhooks/sandbox/status", {"MessageSid": SID, "MessageStatus": "sent"}).status_code
        == 200
    )
    applied(app)
    assert statuses(conn) == [("delivered", None), ("sent", None)]


def test_a_forged_or_unsigned_receipt_is_refused_and_nothing_is_stored(receiver, caplog):
    url, conn, app = receiver
    form = {"MessageSid": SID, "MessageStatus": "failed", "ErrorCode": "30003"}
    assert post_signed(url, "/webhooks/sandbox/status", form, token="not-the-token").status_code == 403
    assert httpx.post(url + "/webhooks/sandbox/status", data=form).status_code == 403
    assert app.state.journal.appended == 0
    assert statuses(conn) == []
    assert "refused (403)" in caplog.text


def test_a_malformed_receipt_gets_400(receiver):
    url, conn, _ = receiver
    assert post_signed(url, "/webhooks/sandbox/status", {"MessageStatus": "delivered"}).status_code == 400
    assert statuses(conn) == []


def test_a_receipt_before_its_message_id_is_recorded_is_kept_and_adopted_later(receiver):
    url, conn, app = receiver
    early = "SM" + "cd" * 16
    form = {"MessageSid": early, "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert post_signed(url, "/webhooks/sandbox/status", form).status_code == 200
    applied(app)
    assert statuses(conn) == []
    assert conn.execute("select count(*) from orphan_status_events").fetchone()[0] == 1
    conn.execute(
        "insert into messages (message_id, idempotency_key, campaign_id, variant, contact_id, state, provider,"
        " provider_message_id, planned_at) values (8, '1:2', 1, 'A', 2, 'submitted', 'sandbox', ?, '2026-01-01')",
        (early,),
    )
    assert webhooks.adopt_orphans(conn) == 1
    assert statuses(conn) == [("undelivered", "30003")]
    assert conn.execute("select count(*) from orphan_status_events").fetchone()[0] == 0


def test_a_stop_reply_opts_the_number_out_and_gets_the_auto_reply(receiver):
    url, conn, app = receiver
    form = {"MessageSid": "SM" + "ef" * 16, "From": "+79123456789", "To": "SHOPMARKET", "Body": " Стоп! "}
    reply = post_signed(url, "/webhooks/sandbox/inbound", form)
    assert reply.status_code == 200 and "<Message>" in reply.text
    applied(app)
    assert consent.may_send(conn, "+79123456789", "promo") == (False, "opted_out")
    again = post_signed(url, "/webhooks/sandbox/inbound", form)
    assert again.status_code == 200
    applied(app)
    assert conn.execute("select count(*) from inbound_messages").fetchone()[0] == 1


def test_a_tracked_link_records_the_click_and_redirects_to_the_stored_address(receiver):
    url, conn, app = receiver
    answer = httpx.get(
        url + "/l/Tok3nAbc", headers={"User-Agent": "Mozilla/5.0 (iPhone)"}, follow_redirects=False
    )
    assert answer.status_code == 302
    assert answer.headers["location"] == "https://shop.example.ru/sale?utm_source=sms"
    probe = httpx.head(url + "/l/Tok3nAbc", headers={"User-Agent": "Slackbot-LinkExpanding 1.0"})
    assert probe.status_code == 302 and probe.headers["location"] == answer.headers["location"]
    applied(app)
    assert conn.execute("select message_id, user_agent, method from clicks order by click_id").fetchall() == [
        (7, "Mozilla/5.0 (iPhone)", "GET"),
        (7, "Slackbot-LinkExpanding 1.0", "HEAD"),
    ]
    for bad in ("/l/unknown-token", "/l/Tok3nAbc%2F..%2Fx", "/l/https:%2F%2Fevil.example"):
        assert httpx.get(url + bad, follow_redirects=False).status_code == 404


def test_a_receipt_is_answered_at_once_while_the_store_is_locked_and_applied_after(home, receiver):
    url, conn, app = receiver
    blocker = holding_the_write_lock(home)
    started = time.monotonic()
    answer = post_signed(url, "/webhooks/sandbox/status", {"MessageSid": SID, "MessageStatus": "delivered"})
    assert answer.status_code == 200 and time.monotonic() - started < 1.0  # journaled, not waiting
    time.sleep(0.5)
    assert statuses(conn) == []  # the store is still locked
    blocker.rollback()
    applied(app)
    assert statuses(conn) == [("delivered", None)]


def test_receipts_arriving_together_share_a_journal_commit_and_none_is_lost(home, receiver):
    url, conn, app = receiver
    sids = add_messages(conn, 20)
    forms = [{"MessageSid": sid, "MessageStatus": s} for sid in sids for s in ("sent", "delivered")]
    blocker = holding_the_write_lock(home)
    with ThreadPoolExecutor(len(forms)) as pool:
        answers = [pool.submit(post_signed, url, "/webhooks/sandbox/status", form) for form in forms]
        assert [a.result(timeout=10).status_code for a in answers] == [200] * len(forms)
    assert app.state.journal.commits < len(forms)  # requests that arrived together shared commits
    blocker.rollback()
    applied(app)
    assert conn.execute("select count(*) from message_status_events").fetchone()[0] == len(forms)


def test_a_journal_entry_the_store_refuses_is_kept_aside_and_the_rest_is_applied(home, receiver):
    _, conn, app = receiver
    sids = add_messages(conn, 2)
    now = datetime.now(UTC)

    def update(sid: str, status: str) -> list[StatusUpdate]:
        return [StatusUpdate("sandbox", sid, status, None, now)]

    journal = app.state.journal
    for entries in (update(sids[0], "delivered"), update(sids[0], "sent") + update(sids[1], "not-a-status"),
                    update(sids[1], "delivered")):  # fmt: skip
        journal.append_sync([ingress.status_entry("sandbox", entries)])
    applied(app)
    stored = conn.execute("select provider_message_id, status from message_status_events order by 1, 2")
    assert stored.fetchall() == [(sids[0], "delivered"), (sids[1], "delivered")]  # no half of the bad one
    ((kind, error),) = conn.execute("select kind, error from ingress_rejects").fetchall()
    assert kind == "status" and "IntegrityError" in error


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"%zz=\xff\xfe", 400),
        (b"MessageSid=SM1&MessageStatus", 400),  # a field without '=': strict parsing
        (b"MessageSid=" + b"x" * (webhooks.MAX_BODY_BYTES + 1), 413),
    ],
)
def test_a_body_that_is_not_a_form_or_too_big_is_refused_and_nothing_is_stored(receiver, body, status):
    url, conn, _ = receiver
    answer = httpx.post(
        url + "/webhooks/sandbox/status",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "x"},
    )
    assert answer.status_code == status
    assert statuses(conn) == []


def test_an_sms_ru_status_callback_is_stored_and_answered_100(home, receiver):
    _, conn, _ = receiver
    conn.execute(
        "insert into messages (idempotency_key, campaign_id, variant, contact_id, state, provider,"
        " provider_message_id, planned_at) values ('1:ru', 1, 'A', 9, 'submitted', 'smsru', '000-100', '2026-01-01')"
    )
    smsru = from_config("smsru", {"SMSRU_API_ID": "api", "SMSRU_CALLBACK_TOKEN": "s3cret-token"})
    app = webhooks.create_app({"smsru": smsru}, home=home)
    form = {"data[0]": "sms_status\n000-100\n103", "data[1]": "sms_status\n000-100\n102"}
    with serve_in_thread(app) as server:
        refused = httpx.post(server.url + "/webhooks/smsru/status?token=wrong", data=form)
        answer = httpx.post(server.url + "/webhooks/smsru/status?token=s3cret-token", data=form)
    assert refused.status_code == 403
    assert answer.status_code == 200 and answer.text == "100"
    assert statuses(conn) == [("delivered", None), ("sent", None)]


def test_behind_a_proxy_receipts_are_verified_against_the_public_url(home, receiver):
    _, conn, _ = receiver
    app = webhooks.create_app(
        {"sandbox": from_config("sandbox", {})}, home=home, public_url="https://sms.example.ru/"
    )
    form = {"MessageSid": SID, "MessageStatus": "delivered"}
    public = request_signature(SANDBOX_AUTH_TOKEN, "https://sms.example.ru/webhooks/sandbox/status", form)
    with serve_in_thread(app) as server:
        local = post_signed(server.url, "/webhooks/sandbox/status", form)  # signed for the local URL
        outside = httpx.post(
            server.url + "/webhooks/sandbox/status", data=form, headers={"X-Twilio-Signature": public}
        )
    assert (local.status_code, outside.status_code) == (403, 200)
    assert statuses(conn) == [("delivered", None)]


def test_a_receipt_for_a_provider_that_is_not_configured_gets_404(receiver):
    url, conn, _ = receiver
    assert (
        post_signed(url, "/webhooks/twilio/status", {"MessageSid": SID, "MessageStatus": "sent"}).status_code
        == 404
    )
    assert statuses(conn) == []
