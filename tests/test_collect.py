"""The Segment-compatible collection endpoint, driven by Segment's own Python library."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime

import pytest
import segment.analytics as segment_analytics
from segment.analytics.request import APIError, post

from smsops import collect, ingress, store, webhooks
from smsops.providers import from_config
from smsops.providers.sandbox import serve_in_thread

KEY = "wk_test_0123456789"


@pytest.fixture
def collector(home, monkeypatch):
    monkeypatch.setenv(collect.WRITE_KEY_ENV, KEY)
    app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=home)
    conn = store.open_store(home)
    with serve_in_thread(app) as server:
        yield server.url.rstrip("/") + "/segment", conn, app
    conn.close()


def applied(app) -> None:
    """Wait until the app's applier has moved everything journaled into the store."""
    assert app.state.applier.drain(timeout=20), app.state.applier.last_error


def client(host: str, key: str = KEY) -> segment_analytics.Client:
    errors: list[Exception] = []
    c = segment_analytics.Client(
        key, host=host, sync_mode=True, max_retries=0, on_error=lambda e, _: errors.append(e)
    )
    c.errors = errors  # type: ignore[attr-defined]
    return c


def test_identify_track_and_order_completed_land_in_the_store(collector):
    host, conn, app = collector
    c = client(host)
    c.identify(
        "crm-42",
        {"phone": "8 (912) 345-67-89", "firstName": "Анна", "last_name": "Петрова", "email": "Anna@Example.ru",
         "city": "Казань", "birthday": "1990-05-17", "gender": "female", "loyalty": "gold"},
        message_id="m-1",
    )  # fmt: skip
    c.track("crm-42", "Cart Abandoned", {"items": 2}, timestamp=datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    c.track(
        "crm-42", "Order Completed",
        {"order_id": "A-1001", "total": 2599.5, "currency": "rub", "products": [{"category": "shoes"}]},
        message_id="m-3",
    )  # fmt: skip
    assert c.errors == []
    applied(app)
    contact = conn.execute(
        "select external_id, first_name, last_name, email, city, birth_date, gender, phone_e164, phone_valid,"
        " attributes from contacts"
    ).fetchall()
    assert contact == [
        ("crm-42", "Анна", "Петрова", "anna@example.ru", "Казань", "1990-05-17", "f", "+79123456789", 1,
         '{"loyalty":"gold"}'),  # json_patch writes it compact
    ]  # fmt: skip
    events = conn.execute("select event_type, occurred_at from customer_events order by event_id").fetchall()
    assert events[0] == ("Cart Abandoned", "2026-03-01 12:00:00")
    assert events[1][0] == "Order Completed"
    orders = conn.execute("select external_id, amount, currency, category, status from orders").fetchall()
    assert orders == [("A-1001", 2599.5, "RUB", "shoes", "paid")]


def test_a_repeated_message_id_changes_nothing(collector):
    host, conn, app = collector
    c = client(host)
    c.identify("crm-7", {"first_name": "Иван"}, message_id="same")
    c.identify("crm-7", {"first_name": "Пётр"}, message_id="same")
    c.track("crm-7", "Viewed", message_id="ev")
    c.track("crm-7", "Viewed", message_id="ev")
    post(KEY, host=host, batch=[
        {"type": "identify", "userId": "crm-7", "messageId": "twice", "traits": {"city": "Омск"}},
        {"type": "identify", "userId": "crm-7", "messageId": "twice", "traits": {"city": "Тверь"}},
    ])  # fmt: skip
    assert c.errors == []
    applied(app)
    assert conn.execute("select first_name, city from contacts").fetchall() == [("Иван", "Омск")]
    assert conn.execute("select count(*) from customer_events").fetchone()[0] == 1


def test_a_wrong_write_key_is_refused_401(collector):
    host, conn, app = collector
    with pytest.raises(APIError) as refused:
        post("wrong-key", host=host, batch=[{"type": "track", "userId": "u", "event": "x", "messageId": "1"}])
    assert refused.value.status == 401
    applied(app)
    assert conn.execute("select count(*) from customer_events").fetchone()[0] == 0


def test_a_batch_over_500_kb_is_refused_413(collector):
    host, conn, app = collector
    batch = [
        {
            "type": "track",
            "userId": "u",
            "event": "x",
            "messageId": str(i),
            "properties": {"pad": "y" * 30_000},
        }
        for i in range(20)
    ]
    with pytest.raises(APIError) as refused:
        post(KEY, host=host, batch=batch)
    assert refused.value.status == 413
    applied(app)
    assert conn.execute("select count(*) from customer_events").fetchone()[0] == 0


def test_a_bad_message_refuses_the_batch_naming_its_index_and_field(collector):
    host, conn, app = collector
    batch = [
        {"type": "track", "userId": "u", "event": "Viewed", "messageId": "ok"},
        {"type": "track", "userId": "u", "event": "Order Completed", "messageId": "bad",
         "properties": {"order_id": "A-1", "currency": "RUB"}},
    ]  # fmt: skip
    with pytest.raises(APIError) as refused:
        post(KEY, host=host, batch=batch)
    assert refused.value.status == 400
    errors = refused.value.response.json()["errors"]
    assert errors == [{"index": 1, "field": "properties.total", "reason": errors[0]["reason"]}]
    applied(app)
    assert conn.execute("select count(*) from customer_events").fetchone()[0] == 0


def test_a_batch_is_answered_while_the_store_is_locked_and_applied_after(collector, home):
    host, conn, app = collector
    other = sqlite3.connect(store.store_path(home), isolation_level=None, check_same_thread=False)
    other.execute("begin immediate")  # a launch or a build holding the store's write lock
    try:
        started = time.monotonic()
        post(KEY, host=host, batch=[{"type": "track", "userId": "u", "event": "Viewed", "messageId": "held"}])
        assert time.monotonic() - started < 2
        assert conn.execute("select count(*) from customer_events").fetchone()[0] == 0
    finally:
        other.execute("rollback")
        other.close()
    applied(app)
    assert conn.execute("select event_type from customer_events").fetchall() == [("Viewed",)]


def test_a_journal_made_before_segment_entries_takes_them_and_keeps_its_ids(tmp_path):
    path = tmp_path / "ingress.sqlite"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("create table meta (key text primary key, value text not null) strict")
    old.execute("insert into meta values ('journal_id', 'j1')")
    old.execute(
        "create table entries (entry_id integer primary key autoincrement, kind text not null check (kind in"
        " ('status', 'inbound', 'click')), provider text, phone text, keyword text check (keyword in ('stop',"
        " 'start', 'help')), payload text not null, received_at text not null) strict"
    )
    for n in range(5):
        old.execute("insert into entries (kind, payload, received_at) values ('click', '{}', ?)", (str(n),))
    old.execute("delete from entries where entry_id > 3")  # applied and pruned: id 5 was handed out
    old.close()
    jconn = ingress.connect(path)
    jconn.execute("insert into entries (kind, payload, received_at) values ('segment', '{}', 'x')")
    assert jconn.execute("select entry_id, kind from entries order by entry_id").fetchall() == [
        (1, "click"), (2, "click"), (3, "click"), (6, "segment"),
    ]  # fmt: skip
    assert jconn.execute(
        "select count(*) from sqlite_master where name = 'ix_entries_keyword'"
    ).fetchone() == (1,)
    jconn.close()


def test_the_endpoint_is_off_without_a_write_key(home, monkeypatch):
    monkeypatch.delenv(collect.WRITE_KEY_ENV, raising=False)
    app = webhooks.create_app({"sandbox": from_config("sandbox", {})}, home=home)
    with serve_in_thread(app) as server, pytest.raises(APIError) as refused:
        post(KEY, host=server.url.rstrip("/") + "/segment", batch=[])
    assert refused.value.status == 404


# -- the pure part ------------------------------------------------------------------------


def test_parse_reads_a_batch_and_honours_timestamps():
    body = json.dumps(
        {"batch": [
            {"type": "identify", "userId": 5, "messageId": "a", "traits": {"phone": "+7 912 345 67 89", "vip": True}},
            {"type": "page", "userId": "5", "messageId": "b"},
            {"type": "track", "userId": "5", "messageId": "c", "event": "Order Completed",
             "timestamp": "2026-02-01T10:00:00+03:00", "properties": {"order_id": 9, "revenue": 10}},
        ]}
    ).encode()  # fmt: skip
    contact, event, order = collect.parse(body)
    assert isinstance(contact, collect.Contact) and contact.external_id == "5"
    assert contact.phone is not None and contact.phone.e164 == "+79123456789"
    assert contact.attributes == {"vip": True}
    assert isinstance(event, collect.Event) and event.at == "2026-02-01 07:00:00"
    assert order == collect.Order("c", "9", "5", "2026-02-01 07:00:00", 10.0, "RUB")


def test_parse_lists_every_bad_message():
    body = json.dumps(
        {"batch": [
            {"type": "track", "messageId": "a", "event": "x"},
            {"type": "identify", "userId": "u", "traits": {"birthday": "soon"}, "messageId": "b"},
            {"type": "nonsense"},
        ]}
    ).encode()  # fmt: skip
    with pytest.raises(collect.Invalid) as refused:
        collect.parse(body)
    assert [(p.index, p.field) for p in refused.value.problems] == [
        (0, "userId"), (1, "traits.birthday"), (2, "type"),
    ]  # fmt: skip


def test_parse_refuses_a_message_over_32_kb():
    body = json.dumps({"batch": [{"type": "track", "userId": "u", "messageId": "a", "event": "x" * 40_000}]})
    with pytest.raises(collect.TooLarge):
        collect.parse(body.encode())
