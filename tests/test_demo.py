"""The demo generator: deterministic for a seed, realistic enough that every mart has data."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from datetime import date

import pytest

from smsops import demo, store

AS_OF = date(2025, 11, 20)


def table_digest(path, table: str) -> str:
    conn = sqlite3.connect(path)
    try:
        digest = hashlib.sha256()
        for row in conn.execute(f"select * from {table} order by 1"):
            digest.update(repr(row).encode())
        return digest.hexdigest()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo")
    summary = demo.generate(2_000, 11, as_of=AS_OF, home=home)
    conn = sqlite3.connect(summary.path)
    yield summary, conn
    conn.close()


def rows(conn, sql, *params):
    return conn.execute(sql, params).fetchall()


def test_same_seed_and_date_give_the_same_base(tmp_path):
    a = demo.generate(800, 5, as_of=AS_OF, home=tmp_path / "a")
    b = demo.generate(800, 5, as_of=AS_OF, home=tmp_path / "b")
    c = demo.generate(800, 6, as_of=AS_OF, home=tmp_path / "c")
    assert a.counts == b.counts
    for table in store.TABLES:
        assert table_digest(a.path, table) == table_digest(b.path, table), table
    assert table_digest(a.path, "contacts") != table_digest(c.path, "contacts")


def test_every_table_has_rows(small_demo):
    summary, _ = small_demo
    history = (
        "contacts", "consent_events", "orders", "customer_events", "campaigns", "campaign_variants",
        "messages", "message_status_events", "links", "clicks", "inbound_messages",
    )  # fmt: skip
    assert all(summary.counts[table] > 0 for table in history), summary.counts
    assert summary.counts["contacts"] == 2_000


def test_phone_numbers_come_in_the_messy_forms_crms_hold(small_demo):
    _, conn = small_demo
    raw = [r[0] for r in rows(conn, "select phone_raw from contacts where phone_raw is not null")]
    patterns = {
        "8 (9xx) xxx-xx-xx": r"^8 \(9\d\d\) \d{3}-\d\d-\d\d$",
        "+7 9xx xxx xx xx": r"^\+7 9\d\d \d{3} \d\d \d\d$",
        "79xxxxxxxxx": r"^79\d{9}$",
        "9xxxxxxxxx": r"^9\d{9}$",
        "non-breaking spaces": "\u00a0",
    }
    for name, pattern in patterns.items():
        assert any(re.search(pattern, r) for r in raw), name
    total = len(rows(conn, "select 1 from contacts"))
    invalid = rows(conn, "select count(*) from contacts where phone_valid = 0")[0][0]
    assert 0.02 < invalid / total < 0.15
    reasons = {r[0] for r in rows(conn, "select distinct phone_reason from contacts where phone_valid = 0")}
    assert "not_mobile" in reasons  # landlines
    assert len(reasons) >= 3
    countries = {
        r[0] for r in rows(conn, "select distinct phone_country from contacts where phone_valid = 1")
    }
    assert "RU" in countries and len(countries) >= 5
    dupes = rows(conn, "select count(*) from (select phone_e164 from contacts where phone_e164 is not null"
                       " group by 1 having count(*) > 1)")[0][0]  # fmt: skip
    assert dupes > 0


def test_names_are_cyrillic_and_latin_and_cities_span_time_zones(small_demo):
    _, conn = small_demo
    names = [r[0] for r in rows(conn, "select first_name from contacts where first_name is not null")]
    assert any(re.match(r"^[А-ЯЁ][а-яё]+$", n) for n in names)
    assert any(re.match(r"^[A-Z][a-z]+$", n) for n in names)
    zones = {r[0] for r in rows(conn, "select distinct time_zone from contacts where phone_country = 'RU'")}
    assert {"Europe/Moscow", "Asia/Yekaterinburg", "Asia/Novosibirsk", "Asia/Vladivostok"} <= zones


def test_consent_ledger_has_sources_proof_and_opt_outs(small_demo):
    _, conn = small_demo
    by_action = dict(rows(conn, "select action, count(*) from consent_events group by 1"))
    assert by_action["opt_in"] > 10 * by_action["opt_out"] > 0
    sources = {r[0] for r in rows(conn, "select distinct source from consent_events")}
    assert {"web_form", "import", "keyword_reply"} <= sources
    # every opt-in carries its proof; an opt-out needs none (a provider's STOP list sends none)
    [(unproven,)] = rows(
        conn, "select count(*) from consent_events where action = 'opt_in' and coalesce(proof, '') = ''"
    )
    assert unproven == 0
    # a STOP reply in the inbox is in the ledger as an opt-out by keyword reply
    stops = rows(conn, "select count(*) from inbound_messages where keyword = 'stop'")[0][0]
    recorded = rows(
        conn, "select count(*) from consent_events where source = 'keyword_reply' and action = 'opt_out'"
    )[0][0]
    assert stops > 0 and recorded == stops


def test_orders_have_categories_and_a_long_tail(small_demo):
    _, conn = small_demo
    amounts = sorted(r[0] for r in rows(conn, "select amount from orders"))
    median = amounts[len(amounts) // 2]
    assert amounts[-1] > 8 * median
    assert len({r[0] for r in rows(conn, "select distinct category from orders")}) >= 8
    events = {r[0] for r in rows(conn, "select distinct event_type from customer_events")}
    assert {"signup", "app_open", "cart_abandoned", "payment_due"} <= events


def test_campaign_history_has_variants_holdouts_and_outcomes(small_demo):
    _, conn = small_demo
    kinds = {r[0] for r in rows(conn, "select distinct kind from campaigns")}
    assert kinds == {"promo", "service"}
    variants = {r[0] for r in rows(conn, "select distinct variant from messages")}
    assert {"A", "B", "holdout"} <= variants
    states = dict(rows(conn, "select state, count(*) from messages group by 1"))
    assert states["submitted"] > states["suppressed"] > 0 and states["holdout"] > 0
    # every message not sent says why
    assert (
        rows(conn, "select count(*) from messages where state <> 'submitted' and skip_reason is null")[0][0]
        == 0
    )
    statuses = {r[0] for r in rows(conn, "select distinct status from message_status_events")}
    assert {"sent", "delivered", "undelivered", "failed"} <= statuses
    assert rows(conn, "select count(*) from clicks")[0][0] > 0
    # some receipts arrive out of order: a final status received before 'sent'
    out_of_order = rows(
        conn,
        "select count(*) from message_status_events f join message_status_events s using (message_id)"
        " where s.status = 'sent' and f.status = 'delivered' and f.received_at < s.received_at",
    )[0][0]
    assert out_of_order > 0


def test_a_few_links_are_fetched_by_previews_and_scanners_right_after_delivery(small_demo):
    """Link previews and scanners (HEAD, or a GET naming its fetcher) come seconds after the
    delivery, so the Results page has some to leave out of CTR; people's clicks are GETs."""
    _, conn = small_demo
    agents = ", ".join("?" * len(demo.PREFETCH_AGENTS))
    [(people,)] = rows(
        conn, f"select count(*) from clicks where user_agent not in ({agents})", *demo.PREFETCH_AGENTS
    )
    prefetches = rows(
        conn,
        "select c.method, c.user_agent, (julianday(c.clicked_at) - julianday(e.occurred_at)) * 86400"
        " from clicks c join message_status_events e on e.message_id = c.message_id and e.status = 'delivered'"
        f" where c.user_agent in ({agents})",
        *demo.PREFETCH_AGENTS,
    )
    assert people > 0 and 0 < len(prefetches) < people
    assert {method for method, _, _ in prefetches} == {"GET", "HEAD"}
    assert len({agent for _, agent, _ in prefetches}) > 3
    assert all(0.5 < seconds < 5.5 for _, _, seconds in prefetches)
    assert rows(conn, "select distinct method from clicks where user_agent like 'Mozilla/5.0 (iPhone%'") == [
        ("GET",)
    ]


GAPPY = {
    "contacts": (
        "external_id", "first_name", "last_name", "gender", "birth_date", "email", "city", "region",
        "time_zone", "phone_raw", "phone_e164", "attributes",
    ),
    "orders": ("category",),
    "customer_events": ("properties",),
    "campaigns": ("sender_id", "segment", "policy", "scheduled_at", "finished_at", "holdout_fraction"),
    "campaign_variants": ("sender_id",),
    "messages": ("phone_e164", "body", "encoding", "segments", "price", "currency"),
    "consent_events": ("consent_text", "proof"),
    "inbound_messages": ("to_number", "keyword", "contact_id", "in_reply_to"),
    "clicks": ("user_agent", "method"),
}  # fmt: skip
"""Columns real CRM data and a real history leave empty now and then."""


@pytest.mark.parametrize(("table", "column"), [(t, c) for t, columns in GAPPY.items() for c in columns])
def test_every_column_data_can_leave_empty_is_empty_in_some_rows_and_filled_in_most(
    small_demo, table, column
):
    """The pages are tested on this base (tests/test_pages_nulls.py): each of these columns
    must hold missing values for them to meet, and values, so that both are shown."""
    _, conn = small_demo
    [(total, missing)] = rows(conn, f"select count(*), count(*) - count({column}) from {table}")
    assert 0 < missing < total, (table, column, missing, total)


def test_a_contact_may_have_no_name_and_no_number_at_all(small_demo):
    _, conn = small_demo
    [(nameless,)] = rows(conn, "select count(*) from contacts where first_name is null and last_name is null")
    [(numberless,)] = rows(conn, "select count(*) from contacts where coalesce(phone_raw, '') = ''")
    assert nameless > 0 and numberless > 0


def test_a_message_to_an_invalid_number_is_not_rendered(small_demo):
    """As the planner does: suppressed before rendering, so no text, no price, no link."""
    _, conn = small_demo
    [(suppressed, with_body, linked)] = rows(
        conn,
        "select count(*), count(body), count(l.token) from messages m left join links l using (message_id)"
        " where skip_reason = 'invalid_number'",
    )
    assert suppressed > 0 and with_body == linked == 0


def test_a_store_with_contacts_is_not_overwritten_without_force(tmp_path):
    demo.generate(50, 1, as_of=AS_OF, home=tmp_path)
    with pytest.raises(demo.DemoError, match="already holds contacts"):
        demo.generate(50, 2, as_of=AS_OF, home=tmp_path)
    replaced = demo.generate(60, 2, as_of=AS_OF, home=tmp_path, force=True)
    assert replaced.counts["contacts"] == 60
    assert not list(tmp_path.glob("*.demo-tmp"))


def test_contacts_must_be_positive(tmp_path):
    with pytest.raises(demo.DemoError, match="at least 1"):
        demo.generate(0, 1, home=tmp_path)
