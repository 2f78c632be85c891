"""One flow from audience to launch (AppTest over the demo base): Compose hands its audience and
text to the new-campaign form, and every screen counts the same audience the same way."""

from __future__ import annotations

import itertools
import shutil

import apptest
import pytest
import streamlit as st
from apptest import clear_caches
from streamlit.testing.v1 import AppTest

from smsops import campaigns, i18n, segments, store

TEXT = "{{ first_name | default('Здравствуйте') }}, для постоянных клиентов скидка 10% до воскресенья"


def open_page(page: str, timeout: float = 120) -> AppTest:
    return apptest.open_in_app(page, timeout)


@pytest.fixture(autouse=True)
def english():
    with i18n.language("en"):
        yield


@pytest.fixture
def own_home(built_home, tmp_path, monkeypatch):
    """A copy of the session's built home: drafts and launches write to the store."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    monkeypatch.setenv("SMSOPS_HOME", str(home))
    clear_caches()
    yield home
    clear_caches()
    st.cache_data.clear()


def test_create_a_campaign_from_compose_carries_the_audience_and_the_text(own_home):
    at = open_page("compose")
    at.selectbox(key="compose_audience").set_value("Ready-made: loyal")
    at.text_area(key="compose_text").input(TEXT).run()
    assert not at.exception, at.exception
    at.button(key="compose_to_campaign").click().run()
    assert not at.exception, at.exception

    # the Campaigns page, its new-campaign form filled in and saying where from
    assert at.title[0].value == "Campaigns"
    assert at.text_area(key="new_text_A").value == TEXT
    assert at.selectbox(key="new_audience").value == "Ready-made: loyal"
    assert at.radio(key="new_kind").value == "promo"
    assert any("From Compose" in i.value and "Loyal customers" in i.value for i in at.info)

    # nothing typed twice: a name, and the draft holds Compose's audience and text
    at.switch_page("pages/campaigns.py")  # stay there (AppTest reruns the page it was last sent to)
    at.text_input(key="new_name").input("From compose")
    next(b for b in at.button if b.label == "Create draft").click().run()
    assert any("Draft «From compose» created" in s.value for s in at.success), [e.value for e in at.error]
    draft = next(c for c in campaigns.drafts() if c.name == "From compose")
    assert [v.template_source for v in draft.variants] == [TEXT]
    assert (
        segments.to_dict(draft.segment)["rules"] == segments.to_dict(segments.ready_made()["loyal"])["rules"]
    )
    assert not any("From Compose" in i.value for i in at.info)  # said until the draft is made


# -- one audience, counted alike on every screen, each count saying what it counts ----------------


def number(text: str) -> int:
    return int(text.replace(",", ""))


def metric(at: AppTest, label: str) -> int:
    return number(next(m.value for m in at.metric if m.label == label))


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def test_one_audience_is_counted_alike_on_every_screen_and_each_count_says_what_it_counts(own_home):
    # Segments: the champions, as the page opens
    page = open_page("segments")
    matching = metric(page, "Contacts that match the segment")
    reachable = metric(page, "Reachable for promotions now")
    assert 0 < reachable < matching

    # Compose: the same two figures, named, and why the others cannot get it one click away
    page = open_page("compose")
    page.selectbox(key="compose_audience").set_value("Ready-made: champions").run()
    assert metric(page, "Recipients reachable now") == reachable
    assert f"{reachable:,} reachable for promotions now · {matching:,} match the segment" in captions(page)
    why = next(e for e in page.expander if e.label.startswith("Why"))
    assert why.label == f"Why {matching - reachable:,} of those who match cannot get it"
    assert sum(number(n) for n in why.table[0].value["Contacts"]) == matching - reachable

    # Campaigns: the form says the same; the launch plans what its steps explain
    page = open_page("campaigns")
    page.selectbox(key="new_audience").set_value("Ready-made: champions").run()
    assert f"{matching:,} match the segment · {reachable:,} reachable for promotions now" in captions(page)
    page.text_input(key="new_name").input("Counted alike")
    next(b for b in page.button if b.label == "Create draft").click().run()
    draft = next(c for c in campaigns.drafts() if c.name == "Counted alike")
    page.selectbox(key="launch_pick").set_value(draft.campaign_id).run()
    steps = page.table[0].value
    assert number(steps["Remaining"].iloc[0]) == matching  # "in the segment now"
    planned = metric(page, "Planned")
    assert number(steps["Remaining"].iloc[-1]) == planned
    said = captions(page)
    assert (
        f"{matching:,} match the segment → {planned:,} planned after consent, duplicates and frequency caps"
        in said
    )
    if planned != reachable:  # the warehouse and the live checks differ: said, and the steps show whom
        assert f"Segments and Compose count {reachable:,} reachable for promotions now" in said

    # launched, followed: progress counts against what was planned, and the list agrees
    page.button(key="launch_start").click().run()
    page.button(key="launch_confirmed").click().run()
    page.selectbox(key="follow_pick").set_value(draft.campaign_id).run()
    assert not page.exception, page.exception
    assert page.get("progress")[0].proto.text.startswith(f"0 of {planned:,} planned messages done")
    assert f"At launch: {matching:,} match the segment → {planned:,} planned" in captions(page)
    listing = page.dataframe[0].value
    row = listing[listing["id"] == str(draft.campaign_id)].iloc[0]
    assert (number(row["In the segment"]), number(row["Planned"])) == (matching, planned)
    assert number(row["Not sent"]) == metric(page, "Not sent") == 0


# -- progress only moves forward ------------------------------------------------------------------------


def outbox(home, rows: list[tuple[str, str | None, int | None]]) -> int:
    """A running campaign whose outbox holds ``rows`` of (state, skip_reason, segments), as a launch
    leaves it: no row claimed by a dispatcher yet, those the checks left out without a text."""
    now = "2030-01-01 10:00:00"
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at, launched_at)"
                " values ('Forward', 'promo', 'running', 'SHOP', ?, ?) returning campaign_id",
                (now, now),
            ).fetchone()
            for i, (state, reason, parts) in enumerate(rows, start=1):
                conn.execute(
                    "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
                    " segments, state, skip_reason, planned_at) values (?, ?, 'A', ?, ?, ?, ?, ?, ?, ?)",
                    (
                        f"{cid}:{i}",
                        cid,
                        i,
                        f"+7999000{i:04d}",
                        "Скидка" if parts else None,
                        parts,
                        state,
                        reason,
                        now,
                    ),
                )
    finally:
        conn.close()
    return cid


def move(home, cid: int, frm: str, to: str, reason: str | None = None, n: int = 1) -> None:
    """What the dispatcher (or a lookup) does to ``n`` rows in state ``frm``."""
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            conn.execute(
                "update messages set state = ?, skip_reason = ?,"
                " provider = case when ? = 'sending' then 'sandbox' else provider end where message_id in ("
                " select message_id from messages where campaign_id = ? and state = ? order by message_id limit ?)",
                (to, reason, to, cid, frm, n),
            )  # a claim names the provider, as the dispatcher's does
    finally:
        conn.close()


def test_progress_counts_against_the_planned_and_sent_and_not_sent_only_grow(home):
    launch = (
        [("planned", None, 1)] * 10
        + [("suppressed", "no_consent", None)] * 3
        + [("holdout", "holdout", None)]
    )
    cid = outbox(home, launch)
    steps = [
        ("planned", "sending", None, 4),
        ("sending", "submitted", None, 2),
        ("sending", "unknown", "awaiting_lookup", 1),
        ("sending", "suppressed", "opted_out", 1),  # an opt-out that came in mid-campaign: stopped at sending
        ("unknown", "submitted", None, 1),  # the lookup found it sent
        ("planned", "sending", None, 3),
        ("sending", "rejected", "provider_rejected", 1),
        ("sending", "unknown", "fate_unknown", 2),
        ("unknown", "unknown", "unknown_given_up", 2),  # closed unsent by a person
    ]
    seen = [campaigns.tally(cid, home)]
    for frm, to, reason, n in steps:
        move(home, cid, frm, to, reason, n)
        seen.append(campaigns.tally(cid, home))
    for before, after in itertools.pairwise(seen):
        assert after.sent >= before.sent and after.not_sent >= before.not_sent and after.done >= before.done
    for t in seen:
        assert (t.in_segment, t.planned) == (14, 10)  # counted against the planned, not the segment
        assert t.planned == t.sent + t.not_sent + t.unsettled + t.due + t.waiting + t.sending
    last = seen[-1]
    assert (last.sent, last.not_sent, last.due, last.unsettled) == (3, 4, 3, 0)
    assert last.left_out == {"no_consent": 3, "holdout": 1}
    assert last.reasons == {"unknown_given_up": 2, "opted_out": 1, "provider_rejected": 1}


def test_a_view_of_progress_keeps_reading_only_while_the_counts_can_move(home):
    cid = outbox(home, [("submitted", None, 1), ("unknown", "awaiting_lookup", 1)])

    def moving(status: str) -> bool:
        conn = store.open_store(home)
        try:
            with store.transaction(conn):
                conn.execute("update campaigns set status = ? where campaign_id = ?", (status, cid))
        finally:
            conn.close()
        counts = campaigns.tally(cid, home)
        assert counts.moving == campaigns.still_moving(status, counts.unknown.get("awaiting_lookup", 0))
        return counts.moving

    assert moving("running") and moving("paused")  # paused: the lookup still settles by itself
    move(home, cid, "unknown", "submitted")
    assert moving("running") and not moving("paused") and not moving("finished") and not moving("cancelled")
