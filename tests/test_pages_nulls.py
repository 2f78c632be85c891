"""Every page and every tab (AppTest) over the demo base's missing values: no exception, and no
"None", "nan", "NaN", "NaT" or "<NA>" anywhere a person reads (issue 15, item 1).

In the demo base every column real data can leave empty is empty in some rows (smsops.demo.GAPS;
tests/test_demo.py checks that it is), and each page is made to show those rows: contacts
without a name, a number, a CRM id, a city, or with a consent event without proof; a segment of
the contacts missing each field; previews of a message using every field; every campaign on the
Campaigns and Results pages, the one without a sender among them, by every breakdown; a draft
written by another tool with nothing but a name and a text."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
from collections.abc import Iterator

import apptest
import pandas as pd
import pyarrow as pa
import pytest
from apptest import clear_caches
from google.protobuf.message import Message
from streamlit.testing.v1 import AppTest

from smsops import contacts, i18n, results, segments, store
from smsops.i18n import _

RAW = re.compile(r"(?<![\w.])(None|nan|NaN|NaT|<NA>)(?![\w.])")
NOT_TEXT = frozenset({"id", "form_id"})
"""Proto fields that are no text a person reads."""


def open_page(page: str, timeout: float = 60) -> AppTest:
    """The app, then ``pages/<page>.py`` in it: app.py runs first and sets the language."""
    at = apptest.open_in_app(page, timeout)
    assert_clean(at, page)
    return at


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture(autouse=True)
def english():
    """AppTest formats a widget's options again in the test's thread when it sets a value."""
    with i18n.language("en"):
        yield


# --- what a person reads ----------------------------------------------------------------------


def _nodes(node) -> Iterator:
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _nodes(child)


def _table(raw: bytes) -> pd.DataFrame:
    return pa.ipc.open_stream(raw).read_pandas() if raw else pd.DataFrame()


def _gone(value: object) -> bool:
    return value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _cells(arrow: Message, *, chart: bool) -> Iterator[str]:
    """A table's cells as the browser draws them: the text the page formatted (a Styler's display
    values) where there is one, else the value, a missing one drawn as "None". A chart's data
    shows its text (labels, tooltips); a missing number there is no mark, not a word."""
    data = _table(arrow.data)
    shown = _table(arrow.styler.display_values) if arrow.HasField("styler") else pd.DataFrame()
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            text = shown.iat[i, j] if i < shown.shape[0] and j < shown.shape[1] else None
            value = text if isinstance(text, str) and text else data.iat[i, j]
            if isinstance(value, str):
                yield value
            elif not chart:
                yield "None" if _gone(value) else str(value)


def _json_texts(document: object) -> Iterator[str]:
    """The strings of a JSON document (a chart's spec, a table's column configuration)."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key != "$schema":
                yield from _json_texts(value)
    elif isinstance(document, list):
        for item in document:
            yield from _json_texts(item)
    elif isinstance(document, str):
        yield document


def _proto_texts(message: Message, *, chart: bool = False) -> Iterator[str]:
    if message.DESCRIPTOR.name == "ArrowData":
        yield from _cells(message, chart=chart)
        return
    chart = chart or message.DESCRIPTOR.name == "VegaLiteChart"
    for field, value in message.ListFields():
        if field.name in NOT_TEXT:
            continue
        for item in value if field.is_repeated else [value]:
            if isinstance(item, Message):
                yield from _proto_texts(item, chart=chart)
            elif isinstance(item, str) and field.name in ("spec", "columns") and item.startswith(("{", "[")):
                yield from _json_texts(json.loads(item))
            elif isinstance(item, str):
                yield item


def shown_texts(at: AppTest) -> Iterator[str]:
    """Every text of the main area: titles, captions, markdown, messages, metrics and their help,
    widgets' labels and options, tabs' and expanders' labels, tables' cells and headers, charts'
    titles, labels and text data."""
    for node in _nodes(at.main):
        proto = getattr(node, "proto", None)
        if isinstance(proto, Message):
            yield from _proto_texts(proto)


def assert_clean(at: AppTest, where: str) -> None:
    assert not at.exception, f"{where}: {at.exception}"
    raw = [text for text in shown_texts(at) if RAW.search(text)]
    assert not raw, f"{where}: a missing value shown raw in {raw[:5]}"


# --- the base's gaps ----------------------------------------------------------------------------


def ops(home, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(store.store_path(home))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


CONTACT_GAPS = {
    "no name": "c.first_name is null and c.last_name is null",
    "a last name only": "c.first_name is null and c.last_name is not null",
    "no number": "coalesce(c.phone_raw, '') = ''",
    "a number that cannot get SMS": "c.phone_valid = 0 and coalesce(c.phone_raw, '') <> ''",
    "no CRM id": "c.external_id is null",
    "no city, region or time zone": "c.city is null and c.time_zone is null",
    "no gender, birth date, email or attributes": (
        "c.gender is null and c.birth_date is null and c.email is null and c.attributes is null"
    ),
    "an opt-out without proof": (
        "exists (select 1 from consent_events e where e.phone_e164 = c.phone_e164 and e.proof is null)"
    ),
    "an opt-in without its wording": (
        "exists (select 1 from consent_events e where e.phone_e164 = c.phone_e164"
        " and e.action = 'opt_in' and e.consent_text is null)"
    ),
    "a message never rendered": (
        "exists (select 1 from messages m where m.contact_id = c.contact_id and m.body is null"
        " and m.state = 'suppressed')"
    ),
    "a reply tied to no message": (
        "exists (select 1 from inbound_messages i where i.contact_id = c.contact_id and i.in_reply_to is null)"
    ),
}
"""Contacts the Contacts page must show without a raw None: what each lacks, as SQL."""


def findable(home, condition: str) -> tuple[int, str]:
    """A contact matching ``condition`` and what to type to find it: its number when it has one,
    else its name, else nothing (the newest 100 are listed)."""
    newest = ops(home, "select max(contact_id) from contacts")[0][0] - 99
    found = ops(
        home,
        f"""
        select c.contact_id, c.phone_e164, c.first_name, c.last_name from contacts c
        where ({condition})
            and (c.phone_e164 like '+%' or c.first_name is not null or c.last_name is not null
                 or c.contact_id >= ?)
        order by c.phone_e164 like '+%' desc, c.contact_id desc limit 1
        """,
        newest,
    )
    assert found, f"the demo base has no contact with {condition}"
    contact_id, phone, first, last = found[0]
    if phone and phone.startswith("+"):
        return contact_id, phone.removeprefix("+")
    return contact_id, " ".join(part for part in (first, last) if part)


# --- the pages ----------------------------------------------------------------------------------


def test_overview_shows_no_raw_missing_value_in_any_period(built_env):
    at = open_page("overview")
    for days in (7, 30, 90):
        at.button_group(key="days").set_value(days).run()
        assert_clean(at, f"overview, {days} days")


@pytest.mark.parametrize("gap", list(CONTACT_GAPS))
def test_contacts_shows_a_contact_with_missing_values_in_every_tab(built_env, gap):
    contact_id, query = findable(built_env, CONTACT_GAPS[gap])
    at = open_page("contacts")
    at.text_input(key="contact_search").input(query).run()
    assert_clean(at, f"contacts, search for {gap}")
    at.selectbox(key="contact_pick").set_value(contact_id).run()
    assert_clean(at, f"contacts, card of a contact with {gap}")
    at.toggle(key="reveal_numbers").set_value(True).run()
    assert_clean(at, f"contacts, card of a contact with {gap}, numbers shown")
    assert {"Details", "Consent history", "Messages and replies", "Find a contact", "Import a file"} <= {
        t.label for t in at.tabs
    }


def test_contacts_export_writes_a_missing_value_as_an_empty_cell(built_env):
    listed = contacts.search("")
    assert listed.isna().any().any() or (listed == contacts.MISSING).any().any()
    text = contacts.export_csv(listed.drop(columns=["contact_id"])).decode("utf-8-sig")
    assert not RAW.search(text), RAW.search(text)


def test_segments_shows_the_contacts_missing_each_field(built_env):
    """A segment of the contacts without each field in turn: its figures, charts and sample."""
    at = open_page("segments")
    empty = [name for name, spec in segments.fields().items() if "is_empty" in spec.ops]
    assert {"first_name", "city", "gender", "age", "email"} <= set(empty)
    for i, name in enumerate(empty):
        at.session_state["seg_items"] = [{"id": f"gap{i}", "field": name, "op": "is_empty", "value": None}]
        at.run()
        assert_clean(at, f"segments, {name} is empty")
        rule = {"match": "all", "rules": [{"field": name, "op": "is_empty", "value": None}]}
        shown = next(m.value for m in at.metric if m.label.startswith("Contacts"))
        assert shown == i18n.number(segments.count(segments.from_dict(rule))), name


def test_compose_previews_every_field_of_recipients_missing_some(built_env):
    """Every field a template may use, for every audience and both kinds: a missing value
    renders as nothing, never as "None" or "nan"."""
    at = open_page("compose")
    fields = segments.template_fields()
    at.text_area(key="compose_text").input(
        "Hi "
        + " / ".join(f"{{{{ {name} }}}}" for name in fields)
        + " {{ link('https://shop.example.ru/sale') }}"
    ).run()
    assert_clean(at, "compose, every field")
    audiences = at.selectbox(key="compose_audience").options
    for kind in ("promo", "service"):
        at.segmented_control(key="compose_kind").set_value(kind).run()
        for index in range(len(audiences)):
            at.selectbox(key="compose_audience").set_value(
                at.selectbox(key="compose_audience").options[index]
            )
            at.run()
            assert_clean(at, f"compose, {kind}, audience {audiences[index]}")
    assert at.text and all(t.value.startswith("Hi ") for t in at.text), "previews of the text typed"


def test_campaigns_follows_every_campaign(built_env):
    """The listing (campaigns with and without a schedule), and every launched campaign in the
    Follow tab, among them one without a sender and automations without a segment or policy."""
    unsigned = ops(built_env, "select count(*) from campaigns where sender_id is null")[0][0]
    assert unsigned and ops(built_env, "select count(*) from campaigns where scheduled_at is null")[0][0]
    at = open_page("campaigns")
    launched = [
        row[0] for row in ops(built_env, "select campaign_id from campaigns where launched_at is not null")
    ]
    for campaign_id in launched:
        at.selectbox(key="follow_pick").set_value(campaign_id).run()
        assert_clean(at, f"campaigns, following campaign {campaign_id}")
    assert {"New campaign", "Test and launch", "Follow"} <= {t.label for t in at.tabs}


@pytest.fixture
def own_home(built_home, tmp_path, monkeypatch):
    """A copy of the session's built home, to write into."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    monkeypatch.setenv("SMSOPS_HOME", str(home))
    return home


def test_campaigns_shows_a_draft_another_tool_wrote_with_nothing_but_a_name_and_a_text(own_home):
    """No sender, audience, policy or schedule: the Test and launch tab says what is missing."""
    conn = sqlite3.connect(store.store_path(own_home))
    with conn:
        campaign_id = conn.execute(
            "insert into campaigns (name, kind, status, created_at) values ('Imported draft', 'promo', 'draft',"
            " '2025-01-01 00:00:00') returning campaign_id"
        ).fetchone()[0]
        conn.execute(
            "insert into campaign_variants (campaign_id, variant, template) values (?, 'A', 'Скидка 10%')",
            (campaign_id,),
        )
    conn.close()
    at = open_page("campaigns")
    at.selectbox(key="launch_pick").set_value(campaign_id).run()
    assert_clean(at, "campaigns, a draft with nothing but a name and a text")


def test_results_shows_every_campaign_by_every_breakdown(built_env):
    """Every campaign, judged by every metric and broken down by every attribute (contacts
    without a gender or a region among them)."""
    at = open_page("results")
    listed = results.campaigns_with_results()
    assert len(listed) > 1
    seen: set[str] = set()
    for n, campaign_id in enumerate(int(c) for c in listed["campaign_id"]):
        at.selectbox(key="results_pick").set_value(campaign_id).run()
        assert_clean(at, f"results, campaign {campaign_id}")
        if n == 0:
            at.toggle(key="results_reveal").set_value(True).run()
            assert_clean(at, f"results, campaign {campaign_id}, numbers shown")
        if not at.get("button_group"):
            continue  # nothing sent yet: the page says so and stops
        for metric in results.METRICS:
            at.segmented_control(key="results_metric").set_value(metric).run()
            assert_clean(at, f"results, campaign {campaign_id}, judged by {metric}")
        for attribute in results.ATTRIBUTES:
            at.segmented_control(key="results_attribute").set_value(attribute).run()
            assert_clean(at, f"results, campaign {campaign_id}, by {attribute}")
            seen.update(shown_texts(at))
    assert _("Unknown") in seen, "the contacts without a gender or a region were on screen"


def test_results_export_writes_a_missing_value_as_an_empty_cell(built_env):
    for campaign_id in results.campaigns_with_results()["campaign_id"]:
        text = results.export_csv(int(campaign_id)).decode("utf-8-sig")
        assert not RAW.search(text), (campaign_id, RAW.search(text))
