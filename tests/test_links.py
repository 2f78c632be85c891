"""Tracked links: each recipient gets tokens of their own when the dispatcher claims the message,
the text sent is the text kept, and the click route redirects only to the stored address."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from zones import zone_where_it_is

from smsops import consent, dispatch, links, store, templates, webhooks
from smsops.dispatch import DispatchSettings
from smsops.providers import from_config
from smsops.providers.sandbox import SandboxSettings, run_in_thread, serve_in_thread

SENDER = "SHOPMARKET"
SALE = "https://shop.example.ru/sale?utm=sms"
TERMS = "https://shop.example.ru/terms"
SOURCE = f"Скидка 20%: {{{{ link('{SALE}') }}}} Условия: {{{{ link('{TERMS}') }}}} и снова {{{{ link('{SALE}') }}}}"
FAST = SandboxSettings(
    latency=(0.0, 0.0),
    transient_error_rate=0.0,
    duplicate_rate=0.0,
    out_of_order_rate=0.0,
    rate_per_second=100_000,
)
QUICK = DispatchSettings(rate_per_second=1_000, concurrency=4, clients=2, unknown_grace=0.0, linger=10)
DAYTIME = zone_where_it_is(13)  # quiet hours never hold these sends back
PHONES = [f"+7912{i:07d}" for i in range(1, 6)]


def plan_by_hand(home: Path, source: str = SOURCE, phones: list[str] = PHONES) -> int:
    """A running campaign whose outbox holds the template's rendering (placeholders included)."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    body = templates.compile(source).render({})
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at, launched_at)"
                " values ('Ссылки', 'promo', 'running', ?, ?, ?) returning campaign_id",
                (SENDER, now, now),
            ).fetchone()
            conn.execute(
                "insert into campaign_variants (campaign_id, variant, template, sender_id) values (?, 'A', ?, ?)",
                (cid, source, SENDER),
            )
            for contact_id, phone in enumerate(phones, start=1):
                conn.execute(
                    "insert into contacts (contact_id, phone_e164, phone_valid, time_zone, created_at, updated_at)"
                    " values (?, ?, 1, ?, ?, ?)",
                    (contact_id, phone, DAYTIME, now, now),
                )
                conn.execute(
                    "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
                    " state, planned_at) values (?, ?, 'A', ?, ?, ?, 'planned', ?)",
                    (f"{cid}:{contact_id}", cid, contact_id, phone, body, now),
                )
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


def table(home: Path, sql: str, *params) -> list[sqlite3.Row]:
    conn = store.open_store(home)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_tokens_are_unguessably_random_and_fit_the_placeholder():
    tokens = {links.new_token() for _ in range(2_000)}
    assert len(tokens) == 2_000
    assert all(links.TOKEN.fullmatch(t) for t in tokens)
    placeholder = templates.compile("{{ link('https://a.example/') }}").link_placeholder
    assert len(placeholder) == len("https://s.example/l/") + len(next(iter(tokens)))


def test_each_recipient_gets_own_tokens_and_the_provider_gets_the_stored_text(home):
    cid = plan_by_hand(home)
    planned = table(home, "select body from messages where campaign_id = ?", cid)[0]["body"]
    with run_in_thread(FAST) as sandbox:
        report = dispatch.run_sync(
            home, from_config("sandbox", {"SANDBOX_URL": sandbox.url}), QUICK, campaign_id=cid
        )
        listed = httpx.get(f"{sandbox.url}/sandbox/messages", auth=(FAST.account_sid, FAST.auth_token))
        sent = {m["to"]: m["body"] for m in listed.json()}
    assert report.submitted == len(PHONES)
    kept = {r["phone_e164"]: r["body"] for r in table(home, "select phone_e164, body from messages")}
    assert sent == kept  # the text sent is the text kept
    stored = {r["token"]: (r["message_id"], r["url"]) for r in table(home, "select * from links")}
    assert len(stored) == 3 * len(PHONES)  # a token per link() call, per recipient
    for body in kept.values():
        assert len(body) == len(planned) and "xxxxxxx" not in body  # same length, so the same price
        found = re.findall(r"https://s\.example/l/([0-9A-Za-z]{8})", body)
        assert [stored[t][1] for t in found] == [SALE, TERMS, SALE]
        assert len({stored[t][0] for t in found}) == 1


def test_a_message_claimed_again_keeps_the_tokens_it_was_given(home):
    cid = plan_by_hand(home, phones=PHONES[:1])
    tracker = links.Tracker()
    conn = store.open_store(home)
    try:
        (message_id, body) = conn.execute("select message_id, body from messages").fetchone()
        with store.transaction(conn):
            first = tracker.track(conn, [links.Pending(message_id, cid, "A", body)], datetime.now(UTC))
        with store.transaction(conn):  # a crash put the row back; the next claim reads the new text
            again = tracker.track(
                conn, [links.Pending(message_id, cid, "A", first[message_id])], datetime.now(UTC)
            )
        assert again == {}
        assert conn.execute("select body from messages").fetchone()[0] == first[message_id]
        assert conn.execute("select count(*) from links").fetchone()[0] == 3
    finally:
        conn.close()


def test_a_placeholder_keeps_the_base_it_was_planned_with(home, monkeypatch):
    cid = plan_by_hand(home, phones=PHONES[:1])
    monkeypatch.setenv("SMSOPS_LINK_BASE", "https://other.example/go/")
    conn = store.open_store(home)
    try:
        (message_id, body) = conn.execute("select message_id, body from messages").fetchone()
        with store.transaction(conn):
            changed = links.Tracker().track(
                conn, [links.Pending(message_id, cid, "A", body)], datetime.now(UTC)
            )
    finally:
        conn.close()
    assert len(changed[message_id]) == len(body)
    assert changed[message_id].count("https://s.example/l/") == 3


def test_a_tracked_link_redirects_to_the_stored_address_and_records_the_click(home):
    cid = plan_by_hand(home, phones=PHONES[:1])
    with run_in_thread(FAST) as sandbox:
        dispatch.run_sync(home, from_config("sandbox", {"SANDBOX_URL": sandbox.url}), QUICK, campaign_id=cid)
    token = table(home, "select token from links where url = ?", TERMS)[0]["token"]
    app = webhooks.create_app({}, home=home)
    with serve_in_thread(app) as hooks, httpx.Client(base_url=hooks.url) as client:
        answer = client.get(f"/l/{token}", headers={"user-agent": "Mozilla/5.0 test"})
        assert answer.status_code == 302 and answer.headers["location"] == TERMS
        tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
        assert client.get(f"/l/{tampered}").status_code == 404
        assert client.get("/l/..%2F..%2Fetc").status_code == 404
        assert client.get(f"/l/{token}?to=https://evil.example").headers["location"] == TERMS
    clicks = table(home, "select * from clicks")
    assert [(c["token"], c["user_agent"]) for c in clicks] == [
        (token, "Mozilla/5.0 test"),
        (token, f"python-httpx/{httpx.__version__}"),  # the query string changed nothing
    ]


@pytest.mark.parametrize("base", ["https://go.example/", "http://127.0.0.1:8600/l/"])
def test_the_configured_base_is_what_recipients_get(home, monkeypatch, base):
    monkeypatch.setenv("SMSOPS_LINK_BASE", base)
    cid = plan_by_hand(home, source=f"Sale {{{{ link('{SALE}') }}}}", phones=PHONES[:2])
    with run_in_thread(FAST) as sandbox:
        settings = replace(QUICK)
        dispatch.run_sync(
            home, from_config("sandbox", {"SANDBOX_URL": sandbox.url}), settings, campaign_id=cid
        )
    bodies = [r["body"] for r in table(home, "select body from messages")]
    assert all(re.fullmatch(re.escape(f"Sale {base}") + r"[0-9A-Za-z]{8}", b) for b in bodies)
