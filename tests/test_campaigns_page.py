"""The Campaigns page (AppTest): create a draft, check its waterfall and bill, launch once, follow it
and settle the messages whose outcome is unknown."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import apptest
import pytest
import streamlit as st
from apptest import metric_values
from streamlit.testing.v1 import AppTest

from smsops import campaigns, config, i18n, jobs, segments, store


def open_page(page: str = "campaigns", timeout: float = 120) -> AppTest:
    return apptest.open_in_app(page, timeout)


@pytest.fixture(autouse=True)
def english():
    """The test reads the page in English, and so does what it calls directly (a widget's labels
    are formatted again in the test's thread when it sets a value)."""
    with i18n.language("en"):
        yield


@pytest.fixture
def own_home(built_home, tmp_path, monkeypatch):
    """A copy of the session's built home: launching writes to the outbox."""
    home = tmp_path / "home"
    shutil.copytree(built_home, home)
    monkeypatch.setenv("SMSOPS_HOME", str(home))
    st.cache_data.clear()
    segments.close_connections()
    yield home
    segments.close_connections()


def test_the_page_lists_campaigns_and_says_it_is_a_sandbox(own_home):
    at = open_page("campaigns", timeout=120)
    assert any("sandbox" in c.value for c in at.caption)
    listing = at.dataframe[0].value
    assert len(listing) == len(campaigns.list_all())
    # a start time is offered on the team's clock (SMSOPS_TIME_ZONE), not the server's
    offered = campaigns.local_time(
        at.date_input(key="new_day").value, at.time_input(key="new_time").value, config.time_zone()
    )
    assert timedelta(seconds=-60) < offered - datetime.now(UTC) <= timedelta(minutes=15)


def test_create_check_and_launch_a_campaign_once(own_home):
    at = open_page("campaigns", timeout=120)
    at.text_input(key="new_name").input("Page test promo")
    at.selectbox(key="new_audience").set_value("Ready-made: champions")
    at.text_area(key="new_text_A").input("{{ first_name | default('Здравствуйте') }}, скидка 15% для вас")
    next(b for b in at.button if b.label == "Create draft").click().run()
    assert any("Draft «Page test promo» created" in s.value for s in at.success), [e.value for e in at.error]
    draft = next(c for c in campaigns.drafts() if c.name == "Page test promo")
    at.selectbox(key="launch_pick").set_value(draft.campaign_id).run()
    steps = at.table[0].value
    assert "Remaining" in steps.columns and len(steps) >= 3
    to_send = int(next(m.value for m in at.metric if m.label == "Planned").replace(",", ""))
    assert to_send > 0
    at.button(key="launch_start").click().run()
    at.button(key="launch_confirmed").click().run()
    assert any(f"Campaign {draft.campaign_id} launched" in s.value for s in at.success)
    assert campaigns.plan(draft.campaign_id).already_planned  # a second click plans nothing twice
    conn = store.connect(store.store_path(own_home))
    rows = conn.execute("select count(*), count(distinct contact_id) from messages where campaign_id = ?",
                        (draft.campaign_id,)).fetchone()  # fmt: skip
    assert rows[0] == rows[1] > 0  # one row per contact, however many clicks
    assert campaigns.get(draft.campaign_id).status in ("running", "finished")


def test_follow_shows_the_ab_verdict_of_a_test_campaign_from_fresh_counts(own_home):
    from smsops import abtest

    results = campaigns.variant_counts(1)  # the demo's first campaign tested A against B
    assert set(results) == {"A", "B"} and all(trials > 0 for _, trials in results.values())
    verdict = abtest.compare(results)
    at = open_page("campaigns", timeout=120)
    assert any("(id 1," in c for c in at.selectbox(key="follow_pick").options)
    at.selectbox(key="follow_pick").set_value(1).run()
    assert not at.exception
    assert any(verdict.message == m.value for m in [*at.success, *at.info])


def create_draft(at, name: str, **inputs) -> campaigns.Campaign:
    at.text_input(key="new_name").input(name)
    at.selectbox(key="new_audience").set_value("Ready-made: champions")
    at.text_area(key="new_text_A").input("{{ first_name | default('Здравствуйте') }}, скидка 15% для вас")
    for key, value in inputs.items():
        widget = next(w for w in at.main if getattr(w, "key", None) == key)
        widget.set_value(value)
    next(b for b in at.button if b.label == "Create draft").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    draft = next(c for c in campaigns.drafts() if c.name == name)
    assert any(f"(id {draft.campaign_id}" in o for o in at.selectbox(key="launch_pick").options)
    at.selectbox(key="launch_pick").set_value(draft.campaign_id).run()
    return draft


def test_a_test_send_from_the_page_goes_to_the_seed_numbers_and_shows_their_status(own_home, monkeypatch):
    monkeypatch.setenv("SMSOPS_SEED_NUMBERS", "+79990000001")
    at = open_page("campaigns", timeout=120)
    draft = create_draft(at, "Seed test promo")
    at.text_input(key="seed_numbers").input("+79990000001, 8 999 000-00-02").run()
    at.button(key="test_send").click().run()
    assert not at.error, [e.value for e in at.error]
    assert any("personalised with the data of contact" in c.value for c in at.caption)
    table = next(t.value for t in at.table if "Variant" in t.value.columns)
    numbers = sorted(n.replace("\\*", "*") for n in table["Number"])
    assert numbers == ["+7 999 ***-**-01", "+7 999 ***-**-02"]  # masked
    assert set(table["State"]) == {"planned"}
    assert set(table["Provider status"]) == set(table["Why not sent"]) == {"—"}  # not "None" or "nan"
    assert campaigns.get(draft.campaign_id).status == "draft"  # still a draft: the test counts nowhere
    at.text_input(key="seed_numbers").input("12345").run()
    at.button(key="test_send").click().run()
    assert any("'12345'" in e.value for e in at.error)


def test_a_campaign_set_to_start_later_is_scheduled_listed_and_can_be_unscheduled(own_home):
    later = datetime.now(UTC) + timedelta(days=2)
    zone = ZoneInfo(config.time_zone())
    local = later.astimezone(zone)
    at = open_page("campaigns", timeout=120)
    draft = create_draft(
        at, "Scheduled promo", new_start="at a time", new_day=local.date(), new_time=local.time().replace(
            second=0, microsecond=0)
    )  # fmt: skip
    at.button(key="launch_start").click().run()
    at.button(key="launch_confirmed").click().run()
    assert any(f"Campaign {draft.campaign_id} scheduled" in s.value for s in at.success)
    stored = campaigns.get(draft.campaign_id)
    assert stored.status == "scheduled" and abs(stored.scheduled_at - later) < timedelta(minutes=1)
    listing = at.dataframe[0].value
    row = listing[listing["id"] == str(draft.campaign_id)].iloc[0]
    assert row["Starts"] == i18n.datetime_(stored.scheduled_at, tz=config.time_zone())  # the team's clock
    assert row["Status"] == "scheduled" and row["Launched"] == "—"
    assert not len(campaigns.outcome(draft.campaign_id).waterfall) > 1  # audience not frozen yet
    at.button(key="unschedule").click().run()
    assert campaigns.get(draft.campaign_id).status == "draft"


def campaign_with_unknown_outcomes(home, **unknown: int) -> int:
    """A running campaign: 8 messages submitted, then ``unknown`` ones by reason (the outbox
    as the dispatcher leaves it after ambiguous sends)."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    states = [("submitted", None)] * 8 + [("unknown", r) for r, n in unknown.items() for _ in range(n)]
    conn = store.open_store(home)
    try:
        with store.transaction(conn):
            (cid,) = conn.execute(
                "insert into campaigns (name, kind, status, sender_id, created_at, launched_at)"
                " values ('Unknown fate promo', 'promo', 'running', 'SHOP', ?, ?) returning campaign_id",
                (now, now),
            ).fetchone()
            conn.execute(
                "insert into campaign_variants (campaign_id, variant, template, sender_id)"
                " values (?, 'A', 'Скидка 15%', 'SHOP')",
                (cid,),
            )
            contacts = conn.execute(
                "select contact_id, phone_e164 from contacts where phone_e164 is not null limit ?",
                (len(states),),
            ).fetchall()
            for (contact_id, phone), (state, reason) in zip(contacts, states, strict=True):
                conn.execute(
                    "insert into messages (idempotency_key, campaign_id, variant, contact_id, phone_e164, body,"
                    " state, skip_reason, planned_at, attempts) values (?, ?, 'A', ?, ?, 'Скидка 15%', ?, ?, ?, 1)",
                    (f"{cid}:{contact_id}", cid, contact_id, phone, state, reason, now),
                )
    finally:
        conn.close()
    return cid


def store_rows(home, sql: str, *params) -> list[tuple]:
    conn = store.open_store(home)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def follow(campaign_id: int):
    at = open_page("campaigns", timeout=120)
    at.selectbox(key="follow_pick").set_value(campaign_id).run()
    assert not at.exception, at.exception
    return at


def progress_text(at) -> str:
    return at.get("progress")[0].proto.text


def test_follow_says_how_many_outcomes_are_unknown_and_does_not_read_done(own_home):
    cid = campaign_with_unknown_outcomes(own_home, awaiting_lookup=9, fate_unknown=2, record_failed=1)
    at = follow(cid)
    said = [w.value for w in at.warning]
    assert (
        "**12 with an unknown outcome**: 9 are being checked with the provider, 3 need your decision." in said
    )
    assert any("never sent again automatically" in c.value for c in at.caption)
    assert (
        progress_text(at) == "8 of 20 planned messages done · waiting for 12 outcomes"
    )  # not 20 of 20, not "finished"
    assert at.get("progress")[0].proto.value < 100
    assert metric_values(at)["Not sent"] == "0"  # unknown is neither sent nor not sent
    listing = at.dataframe[0].value
    row = listing[listing["id"] == str(cid)].iloc[0]
    assert (row["Sent"], row["Not sent"], row["Unknown outcome"]) == ("8", "0", "12")
    assert campaigns.get(cid).status == "running"


def test_closing_unknown_outcomes_unsent_is_confirmed_recorded_and_finishes_the_campaign(own_home):
    cid = campaign_with_unknown_outcomes(own_home, fate_unknown=2, record_failed=1)
    at = follow(cid)
    assert [w.value for w in at.warning] == ["**3 with an unknown outcome**: 3 need your decision."]
    other_tab = follow(cid)
    for page in (at, other_tab):
        page.button(key="settle_give_up").click().run()
        assert any("Close **3 messages** unsent?" in m.value for m in page.markdown)
    assert (
        store_rows(own_home, "select count(*) from outbox_decisions")[0][0] == 0
    )  # nothing before confirming

    at.button(key="settle_confirmed").click().run()  # no name: asked for, nothing decided
    assert any("Enter your name" in e.value for e in at.error)
    assert store_rows(own_home, "select count(*) from outbox_decisions")[0][0] == 0
    at.text_input(key="settle_by").input("Ирина")
    at.button(key="settle_confirmed").click().run()
    assert not at.exception, at.exception
    assert any(s.value == "3 messages closed unsent; recorded as decided by Ирина." for s in at.success)
    assert store_rows(own_home, "select state, skip_reason, count(*) from messages where campaign_id = ?"
                      " and state <> 'submitted' group by 1, 2", cid) == [("unknown", "unknown_given_up", 3)]  # fmt: skip
    decisions = "select decision, messages, decided_by from outbox_decisions where campaign_id = ?"
    assert store_rows(own_home, decisions, cid) == [("give_up", 3, "Ирина")]
    assert campaigns.get(cid).status == "finished"
    assert not at.warning and progress_text(at).startswith("11 of 11 planned messages done · finished")
    assert not any(getattr(b, "key", None) == "settle_give_up" for b in at.button)

    # the same confirmation clicked again in another tab finds nothing left and changes nothing
    other_tab.text_input(key="settle_by").input("Пётр")
    other_tab.button(key="settle_confirmed").click().run()
    assert any("Nothing left to decide" in i.value for i in other_tab.info)
    assert store_rows(own_home, decisions, cid) == [("give_up", 3, "Ирина")]


def test_sending_unknown_outcomes_again_warns_of_a_second_copy_and_queues_them(own_home):
    cid = campaign_with_unknown_outcomes(own_home, awaiting_lookup=1, fate_unknown=2)
    at = follow(cid)
    at.button(key="settle_retry").click().run()
    assert any("second copy" in w.value for w in at.warning)
    at.text_input(key="settle_by").input("Ирина")
    at.button(key="settle_confirmed").click().run()
    assert any("2 messages queued to be sent again" in s.value for s in at.success)
    assert store_rows(own_home, "select state, skip_reason, count(*) from messages where campaign_id = ?"
                      " and state <> 'submitted' group by 1, 2 order by 1", cid) == [
        ("planned", None, 2), ("unknown", "awaiting_lookup", 1)]  # fmt: skip
    assert store_rows(
        own_home, "select decision, messages from outbox_decisions where campaign_id = ?", cid
    ) == [("retry", 2)]
    assert campaigns.get(cid).status == "running"  # still one to be looked up, two to send


# -- guards: a reason and the way out, and nothing launched that should not be --------------------

NOBODY = segments.Segment("nobody", segments.all_of(segments.Rule("city", "eq", "Нигдешний")))
TEXT = "{{ first_name | default('Здравствуйте') }}, скидка 15% для вас"


def api_draft(name: str, segment=None, text: str = TEXT) -> campaigns.Campaign:
    return campaigns.create(
        name,
        "promo",
        segment or segments.ready_made()["champions"],
        [campaigns.Variant("A", text, "SHOPMARKET")],
    )


def pick(at, campaign_id: int):
    at.selectbox(key="launch_pick").set_value(campaign_id).run()
    assert not at.exception, at.exception
    return at


def shown(at) -> list[str]:
    return [e.value for e in [*at.error, *at.warning, *at.info, *at.success]]


def test_an_empty_message_is_refused_with_the_way_out_and_no_draft_is_made(own_home):
    at = open_page()
    at.text_input(key="new_name").input("Blank promo")
    at.text_area(key="new_text_A").input("   ")
    next(b for b in at.button if b.label == "Create draft").click().run()
    said = [e.value for e in at.error]
    assert any("The message is empty" in e and "Write the text of the message." in e for e in said), said
    assert not any(c.name == "Blank promo" for c in campaigns.drafts())


def test_a_launch_to_nobody_is_refused_and_a_launch_message_is_not_shown_for_another_draft(own_home):
    nobody = api_draft("Nobody promo", NOBODY)
    someone = api_draft("Champions promo")
    at = pick(open_page(), someone.campaign_id)
    at.button(key="launch_start").click().run()
    at.button(key="launch_confirmed").click().run()
    assert any(f"Campaign {someone.campaign_id} launched" in s.value for s in at.success)

    pick(at, nobody.campaign_id)
    assert not at.success, [s.value for s in at.success]  # said once, not beside another draft
    assert any("Nobody is in this campaign's audience now" in e.value for e in at.error), shown(at)
    assert at.button(key="launch_start").disabled
    assert campaigns.get(nobody.campaign_id).status == "draft"


def test_a_test_send_without_seed_numbers_says_so_and_how_to_add_them(own_home, monkeypatch):
    monkeypatch.delenv("SMSOPS_SEED_NUMBERS", raising=False)
    draft = api_draft("Seedless promo")
    at = pick(open_page(), draft.campaign_id)
    assert at.text_input(key="seed_numbers").value == ""
    assert any("No seed numbers" in i.value and "SMSOPS_SEED_NUMBERS" in i.value for i in at.info), shown(at)
    assert at.button(key="test_send").disabled


def test_a_long_message_needs_a_yes_that_shows_its_segments_and_bill(own_home, monkeypatch):
    monkeypatch.setenv("SMSOPS_MAX_PARTS", "1")
    draft = api_draft("Long promo", text=TEXT + ", и ещё много слов о скидках " * 3)
    at = pick(open_page(), draft.campaign_id)
    assert any("over the limit of 1" in w.value for w in at.warning), shown(at)
    at.button(key="launch_start").click().run()
    box = at.checkbox(key="launch_confirm_large_send")
    cost = next(m.value for m in at.metric if m.label == "Cost")
    assert "segments" in box.label and cost in box.label  # the yes names both figures
    assert at.button(key="launch_confirmed").disabled  # no yes, no launch
    assert campaigns.get(draft.campaign_id).status == "draft"
    box.check().run()
    assert not at.button(key="launch_confirmed").disabled
    at.button(key="launch_confirmed").click().run()
    assert any(f"Campaign {draft.campaign_id} launched" in s.value for s in at.success)
    assert campaigns.get(draft.campaign_id).status in ("running", "finished")


def test_tracked_links_to_the_placeholder_address_warn_before_a_launch(own_home, monkeypatch):
    monkeypatch.delenv("SMSOPS_LINK_BASE", raising=False)
    draft = api_draft("Linked promo", text=TEXT + ": {{ link('https://shop.example.ru/sale') }}")
    at = pick(open_page(), draft.campaign_id)
    assert any("SMSOPS_LINK_BASE" in w.value and "https://s.example/l/" in w.value for w in at.warning)
    at.button(key="launch_start").click().run()
    assert any("SMSOPS_LINK_BASE" in w.value for w in at.warning)  # said again in the dialog
    monkeypatch.setenv("SMSOPS_LINK_BASE", "https://go.shop.ru/l/")
    at = pick(open_page(), draft.campaign_id)
    assert not any("SMSOPS_LINK_BASE" in w.value for w in at.warning)


# -- the page in Russian ------------------------------------------------------------------------

RAW = {*campaigns.STATUSES, *campaigns.STATE_LABELS, "promo", "service", "None", "nan", "NaT", "no_consent"}


def everything_shown(at) -> list[str]:
    """Every text the page shows: headings, text, captions, messages, labels and table cells."""
    texts = [e.value for kind in ("title", "markdown", "caption", "error", "warning", "info", "success")
             for e in getattr(at, kind)]  # fmt: skip
    texts += [m.label for m in at.metric] + [m.value for m in at.metric]
    texts += [b.label for b in at.button] + [t.label for t in at.tabs]
    for box in at.selectbox:
        texts += [box.label, *box.options]
    for frame in [*(d.value for d in at.dataframe), *(t.value for t in at.table)]:
        texts += [str(c) for c in frame.columns]
        texts += [str(v) for v in frame.to_numpy().ravel()]
    return texts


def test_the_campaigns_page_reads_in_russian_without_raw_codes(own_home, monkeypatch):
    monkeypatch.setenv("SMSOPS_LANGUAGE", "ru")
    cid = campaign_with_unknown_outcomes(own_home, awaiting_lookup=2, fate_unknown=1)
    draft = api_draft("Рассылка для чемпионов")
    with i18n.language("ru"):
        at = pick(open_page(), draft.campaign_id)
        at.selectbox(key="follow_pick").set_value(cid).run()
        assert not at.exception, at.exception
        texts = everything_shown(at)
    assert at.title[0].value == "Рассылки"
    assert [t.label for t in at.tabs] == ["Новая рассылка", "Тест и запуск", "Ход рассылки"]
    assert not [t for t in texts if t.strip() in RAW], [t for t in texts if t.strip() in RAW]
    assert not [t for t in texts if "None" in t or "nan" in t.split()]
    listing = at.dataframe[0].value
    assert set(listing["Статус"]) <= {"черновик", "запланирована", "идёт отправка", "на паузе", "завершена",
                                     "остановлена"}  # fmt: skip
    assert all(cost.endswith("₽") for cost in listing["Стоимость"])
    assert any("с неизвестным исходом" in w.value for w in at.warning)
    assert "Отправить тест" in [b.label for b in at.button]
    english = ("Campaign", "Draft", "Launch", "message", "Segments", "Cost", "Quiet hours", "Send")
    assert not [t for t in texts if any(word in t for word in english)], [
        t for t in texts if any(word in t for word in english)
    ]


def test_the_campaign_form_inserts_from_the_palette_into_the_chosen_variant_and_previews_each(own_home):
    at = open_page("campaigns", timeout=120)
    at.number_input(key="new_variants").set_value(2).run()
    before = at.text_area(key="new_text_A").value
    at.segmented_control(key="new_insert_into").set_value("B")
    at.selectbox(key="new_field").set_value("city")
    at.button(key="new_insert_field").click().run()
    assert not at.exception, at.exception
    assert at.text_area(key="new_text_B").value.endswith(", {{ city }}")
    assert at.text_area(key="new_text_A").value == before
    at.text_input(key="new_link").input("https://shop.example.ru/sale")
    at.button(key="new_insert_link").click().run()
    assert at.text_area(key="new_text_B").value.endswith(
        "{{ city }} {{ link('https://shop.example.ru/sale') }}"
    )
    previews = [t.value for t in at.text]
    assert len(previews) == 2 and all(p.endswith("Отказ: СТОП") and "{{" not in p for p in previews)
    assert "/xxxxxxxx" in previews[1]
    at.text_area(key="new_text_A").input("{{ first_name ").run()  # a slip shows under its variant
    assert any("line 1" in e.value for e in at.error), [e.value for e in at.error]


def test_follow_refreshes_itself_while_a_campaign_can_move_and_stops_when_it_is_finished(
    own_home, monkeypatch
):
    made = []  # (fragment, run_every) as the page declares them
    declare = st.fragment

    def recording(func=None, *, run_every=None, **options):
        if func is not None:
            made.append((func.__name__, run_every))
        return declare(func, run_every=run_every, **options)

    monkeypatch.setattr(st, "fragment", recording)
    cid = campaign_with_unknown_outcomes(own_home, awaiting_lookup=2)  # running, two being looked up
    at = follow(cid)
    refreshing = [every for name, every in made if name == "follow_live"]
    assert refreshing and refreshing[-1] is not None and refreshing[-1].total_seconds() <= 5
    assert progress_text(at).startswith("8 of 10 planned messages done")

    # the lookups settle and the campaign finishes: the next read stops the refreshing
    conn = store.open_store(own_home)
    with store.transaction(conn):
        conn.execute(
            "update messages set state = 'submitted', skip_reason = null where campaign_id = ?", (cid,)
        )
        conn.execute("update campaigns set status = 'finished' where campaign_id = ?", (cid,))
    conn.close()
    made.clear()
    at.run()  # what the fragment's timer does, as a whole run
    assert not at.exception, at.exception
    assert [every for name, every in made if name == "follow_live"][-1] is None
    assert progress_text(at).startswith("10 of 10 planned messages done · finished")
    assert metric_values(at)["Submitted"] == "10"


def test_a_launch_runs_in_the_background_with_progress_and_is_said_once_done(own_home, monkeypatch):
    """A click answers at once: the launch (seconds on a large audience) runs in the background, the
    page shows its progress and then what it planned, and a draft being launched is not offered."""
    draft = api_draft("Background launch")
    at = pick(open_page(), draft.campaign_id)
    monkeypatch.setenv("SMSOPS_JOB_WAIT", "0")  # what a deployment does: show progress, not wait
    at.button(key="launch_start").click().run()
    at.button(key="launch_confirmed").click().run()
    assert not at.exception, at.exception
    status = jobs.get(jobs.key("launch", draft.campaign_id))
    assert status is not None
    if status.running:  # caught while it plans: progress, and the draft is no longer offered
        assert at.get("progress")
        offered = [b for b in at.selectbox if b.key == "launch_pick"]
        assert not offered or not any(f"id {draft.campaign_id}" in o for o in offered[0].options)
    deadline = time.monotonic() + 60
    while (status := jobs.get(jobs.key("launch", draft.campaign_id))) is not None and status.running:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    at.run()
    assert any(f"Campaign {draft.campaign_id} launched" in s.value for s in at.success), shown(at)
    assert campaigns.get(draft.campaign_id).status in ("running", "finished")
    at.run()
    assert not any(f"Campaign {draft.campaign_id} launched" in s.value for s in at.success)  # said once
